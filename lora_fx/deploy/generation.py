"""Generation as an AOTInductor package: the graph ``lm.generate`` runs (one step of the causal LM over a KV cache
the caller owns, with the adapters of the committed state: unmerged, merged, or a routed bank), compiled ahead of
time with the batch size and the token count dynamic, so one package serves the prompt and every decode step of
any batch::

    logits[B, V] = package(input_ids[B, T], attention_mask[B, L], position_ids[B, T], start[1], *kv)

``lora_fx/generation.json`` in the archive holds what a runner needs (the cache length L, each KV tensor's shape
and dtype, the EOS and pad ids); ``generation.loop.PackagedGenerator`` is that runner (no lora_fx needed). An
unmerged package also records its adapter constants (``lora_fx/adapters.json``), so ``swap_adapter`` loads
another PEFT adapter into it without compiling; a routed one takes ``lora_route`` (``deploy.route``).

Example::

    lora_fx.package_generation(lm, "gen.pt2", max_length=128)
    out = PackagedGenerator("gen.pt2").generate(ids, max_new_tokens=32)    # lm.generate's greedy tokens
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..capture import export_program
from ..errors import AdapterError, CaptureError
from ..generation.generate import cache_length, check_causal_lm, eos_ids, graphs_for, pad_id, step_dims
from ..generation.loop import MANIFEST as GENERATION_MANIFEST
from ..generation.loop import new_cache
from ..passes.derive import ROUTE_INPUT
from .package import MANIFEST, adapter_manifest, constant_names, routed_manifest, write_package


def package_generation(lm: Any, path: str | os.PathLike, *, max_length: int = 256) -> Path:
    """Write ``lm.generate``'s graph for prompts plus new tokens up to ``max_length`` (rounded up to a multiple
    of 64, capped at the model's positions and attention window) as a package at ``path``."""
    model = check_causal_lm(lm)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise AdapterError(f"package_generation: max_length must be an integer >= 2, got {max_length!r}.")
    try:
        cache_len = cache_length(model, max_length, 0)
    except (AdapterError, CaptureError) as e:
        raise AdapterError(f"package_generation(max_length={max_length}): {e}; package a shorter max_length.") \
            from None
    state = lm.state
    routed = state.bank is not None and state.merge is None
    adapters = routed_manifest(lm) if routed else adapter_manifest(lm)
    was = lm.training
    lm.eval()  # a package serves: no dropout
    try:
        entry = graphs_for(lm, cache_len)
        layouts = entry.caps[0].layouts
        device = next(model.parameters()).device
        ids = torch.zeros(2, 2, dtype=torch.long, device=device)
        args = (ids, torch.ones(2, cache_len, dtype=torch.long, device=device), ids.clone(),
                torch.zeros(1, dtype=torch.long, device=device), *new_cache(layouts, 2, device))
        route = {ROUTE_INPUT: state.bank.route(state.bank.slots[0], None).expand(2).clone()} if routed else {}
        dims = step_dims(cache_len, len(layouts), flat=True, route=ROUTE_INPUT if routed else None)
        with lm.reading():
            program = export_program(entry.caps[0].graph_module, args, route, dims)
    finally:
        lm.train(was)
    constant_names(adapters, program)
    eos = eos_ids(model, None)
    meta = {"cache_len": cache_len, "layouts": [[list(shape), str(dtype).removeprefix("torch.")]
                                                for shape, dtype in layouts],
            "eos": eos, "pad": pad_id(model, None, eos), "routed": routed, "route_input": ROUTE_INPUT,
            "model": type(model).__name__}
    files = {GENERATION_MANIFEST: meta, **({MANIFEST: adapters} if adapters is not None else {})}
    return write_package(program, Path(path), files)
