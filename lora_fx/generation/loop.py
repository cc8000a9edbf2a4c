"""The decode loop of ``lm.generate``, and ``PackagedGenerator``, which runs it over a generation package
(``lora_fx.package_generation``). This file imports only torch and the standard library, so a serving process
without lora_fx can run a package with it (copy the file, or ``runpy.run_path`` it).

A step is ``logits[B, V] = step(input_ids[B, T], attention_mask[B, L], position_ids[B, T], start[1], *kv)``
over a KV cache of L slots that the loop owns (one zero tensor per layer's keys and values, written in place by
the step at ``start``): the prompt runs as one step of T tokens, then each new token as a step of one::

    positions = cumsum(mask) - 1 (left padding: 1)        mask over the cache: the prompt's, then 1 per new token
    token = choose(logits); a row stops at an EOS token and is padded after it

C++: ``torch::inductor::AOTIModelPackageLoader(path, "model")`` runs the same package; the loop is these twenty
lines with its ``run(inputs)``, the shapes and dtypes read from ``lora_fx/generation.json`` in the archive.

Example::

    gen = PackagedGenerator("llama-gen.pt2")
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=32)   # lm.generate's greedy tokens
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence

import torch

MANIFEST = "lora_fx/generation.json"


def new_cache(layouts: Sequence, batch: int, device) -> list[torch.Tensor]:
    """An empty KV cache for ``batch`` rows: one zero tensor per layer's keys and values (``layouts``: their
    shapes after the batch dimension, and dtypes)."""
    return [torch.zeros((batch, *shape), dtype=getattr(torch, str(dtype).removeprefix("torch.")), device=device)
            for shape, dtype in layouts]


def decode_loop(step: Callable[..., torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor, cache_len: int,
                layouts: Sequence, max_new_tokens: int, choose: Callable[[torch.Tensor], torch.Tensor],
                eos: Sequence[int], pad: int) -> torch.Tensor:
    """``input_ids`` followed by up to ``max_new_tokens`` tokens per row (``step(which, *args)``: which is
    "prefill" or "decode")."""
    batch, prompt = input_ids.shape
    device = input_ids.device
    kv = new_cache(layouts, batch, device)  # this call's own cache: calls may run side by side
    full = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
    full[:, :prompt] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # Hugging Face's positions under left padding
    eos_ids = torch.tensor(list(eos), dtype=torch.long, device=device)
    with torch.no_grad():
        logits = step("prefill" if prompt > 1 else "decode", input_ids.contiguous(), full, positions,
                      _start(0, device), *kv)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        new = []
        for i in range(max_new_tokens):
            token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), choose(logits))
            new.append(token)
            if len(eos):
                done |= torch.isin(token, eos_ids)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            at = prompt + i
            full[:, at] = 1
            positions = positions[:, -1:] + 1
            logits = step("decode", token[:, None].contiguous(), full, positions, _start(at, device), *kv)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def _start(at: int, device) -> torch.Tensor:
    return torch.tensor([at], dtype=torch.long, device=device)


class PackagedGenerator:
    """Greedy generation from a package written by ``lora_fx.package_generation``: the same tokens as
    ``lm.generate`` with the adapters it was packaged with (any batch size; prompt + new tokens up to the
    packaged cache length)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with zipfile.ZipFile(self.path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/{MANIFEST}")), None)
            if name is None:
                raise ValueError(f"{self.path} is not a generation package (no {MANIFEST}); write it with "
                                 "lora_fx.package_generation.")
            self.meta = json.loads(archive.read(name))
        self.loaded = torch._inductor.aoti_load_package(self.path)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, lora_route: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt + new tokens, ``[B, prompt + new]``; ``eos_token_id`` / ``pad_token_id`` default to the
        model's generation config at packaging; ``lora_route``: a routed package's adapter index per row."""
        meta = self.meta
        batch, prompt = input_ids.shape
        if prompt + max_new_tokens > meta["cache_len"]:
            raise ValueError(f"prompt length {prompt} + max_new_tokens {max_new_tokens} exceeds the package's cache "
                             f"of {meta['cache_len']} tokens; package with a larger max_length.")
        if meta["routed"] != (lora_route is not None):
            raise ValueError("this package routes adapters per row: pass lora_route (one adapter index per row)"
                             if meta["routed"] else "this package has no adapter bank; drop lora_route.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        eos = meta["eos"] if eos_token_id is None else eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad_token_id if pad_token_id is not None else meta["pad"]
        route = {} if lora_route is None else {meta["route_input"]: lora_route.contiguous()}

        def step(which, *args):
            return self.loaded(*args, **route)
        return decode_loop(step, input_ids, mask, meta["cache_len"], meta["layouts"], max_new_tokens,
                           lambda logits: logits.argmax(dim=-1), eos, pad)
