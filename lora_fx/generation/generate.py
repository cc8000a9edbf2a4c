"""Generation with adapters: one graph of the causal LM over a static KV cache, derived from the same adapter store
as the training graph, serving the prefill and every decode step, for every batch size.

``CachedStep`` wraps the Hugging Face causal LM with a ``StaticCache`` whose tensors the caller owns and passes in
(``[batch, heads, cache_len, head_dim]`` per layer, written in place)::

    logits[B, V] = step(input_ids[B, T], attention_mask[B, cache_len], position_ids[B, T], start[1], *kv)

``start`` is where the T new tokens are written in the cache; ``attention_mask`` covers the whole cache (zeros for
left padding and for slots not written yet). One graph is captured per cache length, with the batch B >= 1 and
the token count 1 <= T <= cache_len dynamic: the prompt (T tokens) and each new token (T = 1) run through it. It
is derived from its pristine capture with the LoraModel's adapter state (``passes.derive``) and re-derived lazily
after any change (a training step needs none: the graph reads the store's parameters). The cache length is the
prompt plus the new tokens, rounded up to a multiple of 64 (so several calls share a graph) and capped at the
model's ``max_position_embeddings``; a shorter generation (down to half) runs in a longer cache already captured.
The same graph, exported, is what ``lora_fx.package_generation`` compiles ahead of time.

Example::

    out = lm.generate(ids, attention_mask=mask, max_new_tokens=32)      # prompt + new tokens, as HF's generate
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import fx, nn
from torch.export import Dim

from ..capture import Captured, capture
from ..capture.exporting import share_parameters
from ..capture.signatures import rekey
from ..errors import AdapterError, CaptureError
from .loop import decode_loop, new_cache
from .sampling import SamplingConfig, next_tokens

PREFIX = "model."  # CachedStep holds the causal LM as ``model``


class CachedStep(nn.Module):
    """The causal LM over a static KV cache the caller passes in (``*kv``: each layer's keys and values, written in
    place at ``start``); returns the last position's logits."""

    def __init__(self, model: nn.Module, cache_len: int) -> None:
        super().__init__()
        from transformers import StaticCache

        self.model, self.cache_len = model, cache_len
        self.cache = StaticCache(config=unwindowed(model.config, cache_len), max_cache_len=cache_len)
        params = inspect.signature(model.forward).parameters  # transformers >= 5.2x: "cache"; before: the old name
        self.cache_argument = "cache" if "cache" in params else "past_key_values"
        device = next(model.parameters()).device
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        with torch.no_grad():  # the cache's layers allocate their tensors on first use: their layouts
            self.model(input_ids=ids, attention_mask=torch.ones(1, cache_len, dtype=torch.long, device=device),
                       position_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_argument: self.cache})
        self.layouts = [(tuple(t.shape[1:]), t.dtype) for layer in self.cache.layers for t in (layer.keys,
                                                                                                 layer.values)]

    def forward(self, input_ids, attention_mask, position_ids, start, *kv):
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = kv[2 * i], kv[2 * i + 1]
            layer.cumulative_length = start[0].clone()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_argument: self.cache})
        return out.logits[:, -1]

    def example_inputs(self, batch: int = 2, tokens: int = 2) -> tuple[torch.Tensor, ...]:
        device = next(self.model.parameters()).device
        ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        mask = torch.ones(batch, self.cache_len, dtype=torch.long, device=device)
        return (ids, mask, ids.clone(), torch.zeros(1, dtype=torch.long, device=device),
                *new_cache(self.layouts, batch, device))

    def dims(self) -> dict:
        return step_dims(self.cache_len, len(self.layouts))


def step_dims(cache_len: int, kv: int, *, flat: bool = False, route: str | None = None) -> dict:
    """Dynamic shapes of a step's inputs by name: the batch (any size from 1) and the new tokens (1 to the cache
    length). ``flat``: the KV tensors as a captured graph names them (``kv_0``, ...), else one ``kv`` tuple;
    ``route``: a routed graph's per-row adapter index input."""
    batch, tokens = Dim("batch", min=1), Dim("tokens", min=1, max=cache_len)
    dims = {"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch}, "position_ids": {0: batch, 1: tokens},
            "start": None}
    if flat:
        dims.update({f"kv_{i}": {0: batch} for i in range(kv)})
    else:
        dims["kv"] = tuple({0: batch} for _ in range(kv))
    if route:
        dims[route] = {0: batch}
    return dims


WINDOWS = ("sliding_window", "attention_chunk_size")  # config fields of windowed attention (sliding, chunked)


def window(config) -> int | None:
    """The shortest attention window of the model's windowed layers (None: none)."""
    sizes = [w for w in (getattr(config, n, None) for n in WINDOWS) if isinstance(w, int) and w > 0]
    return min(sizes) if sizes else None


def unwindowed(config, cache_len: int):
    """The config the static cache is built from: a window at least as long as the cache never slides, so its
    layers are plain static layers (the model's own masks still apply the window, a no-op at this length)."""
    w = window(config)
    if w is None:
        return config
    if w < cache_len:
        raise AdapterError(f"{type(config).__name__} attends over a window of {w} tokens; lm.generate's cache of "
                           f"{cache_len} would have to slide, which it does not do yet. Keep prompt + max_new_tokens "
                           f"<= {w}, or merge (lm.merge()) and call the model's own generate.")
    config = copy.deepcopy(config)
    for name in WINDOWS:
        if getattr(config, name, None):
            setattr(config, name, None)
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return config


def check_causal_lm(lm) -> nn.Module:
    model = lm.state.captured.source
    if lm.state.options.sharded:
        raise AdapterError("generate does not run on a LoraModel sharded with FSDP2; save the adapter and generate "
                           "from an unsharded model (lora_fx.from_peft).")
    can = getattr(model, "can_generate", None)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise AdapterError(f"lm.generate runs decoder-only causal LMs; {type(model).__name__} is an encoder-decoder. "
                           "Merge the adapter (lm.merge(): the weights are written back to the model) and call the "
                           "model's own generate, which then sees it; lm.unmerge() afterwards restores W.")
    if lm.state.captured.method != "export" or not callable(can) or not can():
        raise AdapterError(f"generate needs a Hugging Face causal language model captured with example inputs; "
                           f"{type(model).__name__} is not one (its own forward is what lm(...) runs).")
    return model


def cache_length(model: nn.Module, prompt: int, new: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    need = prompt + new
    if limit is not None and need > limit:
        raise AdapterError(f"prompt length {prompt} + max_new_tokens {new} = {need} exceeds the model's "
                           f"max_position_embeddings ({limit}); pass max_new_tokens <= {max(limit - prompt, 0)} or "
                           "a shorter prompt.")
    bucket = -(-need // 64) * 64
    w = window(model.config)
    if w is not None and need > w:
        raise CaptureError(f"{type(model).__name__} attends over a window of {w} tokens and prompt length {prompt} + "
                           f"max_new_tokens {new} = {need} exceeds it, past where the graph's static cache would "
                           "have to slide")  # lm.generate falls back to the model's own generate (a sliding cache)
    if w is not None:  # stay within the window: the cache never slides (see ``unwindowed``)
        bucket = min(bucket, w)
    return min(bucket, limit) if limit is not None else bucket


def graphs_for(lm, cache_len: int):
    """The entry of this cache length: its one capture (``CachedStep``, batch and token count dynamic), captured
    once, derived for the committed state (``entry.caps[0].layouts``: the KV cache tensors it takes)."""
    def capture_step() -> Captured:
        model = lm.state.captured.source
        was = model.training
        try:
            step = CachedStep(model, cache_len).eval()  # generation graphs never drop out
        except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            raise CaptureError(f"a static KV cache cannot hold {type(model).__name__}'s cache ({type(e).__name__}: "
                               f"{str(e)[:120]})") from e
        try:
            cap = capture(step, step.example_inputs(), templates=False, dims=step.dims())
        finally:
            model.train(was)
        cap.layouts = step.layouts
        return _rekey(cap, lm)
    return lm.derived(("generate", cache_len), capture_step, prefix=PREFIX)


def _rekey(cap: Captured, lm) -> Captured:
    """Keys and parameters of the training graph: ``model.x`` -> ``x``, the same Parameter objects."""
    rekey(cap, PREFIX, "")
    holder = nn.Module()
    holder.add_module("model", lm.graph_module)
    share_parameters(cap.graph_module, holder)
    return cap


def run_step(entry, which: str, args: tuple, route: dict, compile_options: dict | None) -> torch.Tensor:
    """The entry's graph on ``args``, eager, or compiled once per ``which`` ("prefill": dynamic token count,
    "decode": one token, specialised)."""
    gm: fx.GraphModule = entry.caps[0].graph_module
    if compile_options is None:
        return gm(*args, **route)
    if which not in entry.extra:
        entry.extra[which] = torch.compile(gm, **{**compile_options, "dynamic": which == "prefill"})
    return entry.extra[which](*args, **route)


def generate(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
             sampling: SamplingConfig, eos_token_id, pad_token_id: int | None = None,
             adapter_names: list[str] | None = None) -> torch.Tensor:
    model = check_causal_lm(lm)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise AdapterError("input_ids must be a [batch, prompt length] tensor of token ids (torch.long).")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AdapterError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    batch, prompt = input_ids.shape
    if batch == 0 or prompt == 0:
        raise AdapterError(f"input_ids has shape {tuple(input_ids.shape)}: generate needs at least one row and one "
                           "prompt token per row.")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
    if mask.shape != input_ids.shape:
        raise AdapterError(f"attention_mask has shape {tuple(mask.shape)}; it must match input_ids "
                           f"{tuple(input_ids.shape)} (1 for tokens, 0 for left padding).")
    cache_len = cache_length(model, prompt, max_new_tokens)
    eos = eos_ids(model, eos_token_id)
    pad = pad_id(model, pad_token_id, eos)
    entry = graphs_for(lm, reusable(lm, cache_len) or cache_len)
    options = lm.state.options.compile_options
    options = dict(options) if options is not None else None
    route = lm.route_kwargs(adapter_names)

    def step(which: str, *args: torch.Tensor) -> torch.Tensor:
        return run_step(entry, which, args, route, options)
    return lm.run_state(entry, lambda: decode_loop(step, input_ids, mask, entry.key[1], entry.caps[0].layouts,
                                                   max_new_tokens, lambda logits: next_tokens(logits, sampling),
                                                   eos, pad))


def pad_id(model: nn.Module, pad_token_id: int | None, eos: list[int]) -> int:
    """The token finished rows are padded with: the given one, the model's generation config's, the first EOS, 0."""
    pad = pad_token_id if pad_token_id is not None else getattr(model.generation_config, "pad_token_id", None)
    return int(pad if pad is not None else (eos[0] if eos else 0))


def reusable(lm, cache_len: int) -> int | None:
    """The shortest captured cache length that can serve this call without a capture: at least as long, at most
    twice (more cache slots cost compute on every step)."""
    sizes = [key[1] for key in lm.derived_keys if isinstance(key, tuple) and key[0] == "generate"]
    fits = [c for c in sizes if cache_len <= c <= 2 * cache_len]
    return min(fits) if fits else None


def eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
