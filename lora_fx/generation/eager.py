"""transformers' own ``generate`` with the adapters: beam search, logits processors, stopping criteria,
streamers, ``GenerationConfig``, encoder-decoders, state-space and hybrid caches: whatever the model's
``generate`` does, run on the model itself with each active, unmerged adapter added to its layer's output by a
forward hook, as PEFT's layers compute it::

    y = layer(x);  for each active adapter (in order):  y = y + s · B A x.to(A.dtype)   (eval: no dropout);  y.to(dtype)

Merged adapters are already in the weights. The hooks live only for the call (``attached``); lm.generate takes this
path when given arguments its own graphs do not take, for encoder-decoders, and where its graphs cannot be
captured (see ``model.calls``). Linear targets; DoRA, other target kinds, ``modules_to_save``, trainable tokens
and per-row ``adapter_names`` are refused with the reason.

Example::

    with attached(lm):
        out = model.generate(input_ids=ids, num_beams=4, max_new_tokens=16)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import AdapterError


def branches(lm) -> dict[str, list]:
    """key -> the units of the active, unmerged adapters on it, in adapter order (refusing what cannot run)."""
    state = lm.state
    merged = set(state.merged)
    out: dict[str, list] = {}
    for name in state.active:
        if name in merged:
            continue
        entry = state.entries[name]
        if entry.saved_copies() or entry.token_deltas() or entry.ties:
            raise AdapterError(f"adapter {name!r} has modules_to_save, trainable tokens or tied layers, which "
                               "transformers' generate path does not apply; use lm.generate's own arguments "
                               "(greedy, sampling), or merge_and_unload() first.")
        for key, unit in entry.by_key.items():
            out.setdefault(key, []).append(unit)
    return out


@contextlib.contextmanager
def attached(lm, context: dict | None = None) -> Iterator[None]:
    """The active adapters added to the model's own layers (forward hooks) for the span of the block; ``context``:
    the call's ``input_ids`` (for variants that read them, aLoRA)."""
    context = dict(context or {})
    source = lm.state.captured.source
    handles = []
    try:
        for key, units in branches(lm).items():
            try:
                module = source.get_submodule(key)
            except AttributeError:
                raise AdapterError(f"{key!r} names no module of {type(source).__name__}; transformers' generate "
                                   "path adds LoRA to modules.") from None
            why = next((w for u in units if (w := u.variant.eager_refusal(u))), None)
            if why:
                raise AdapterError(why)
            handles.append(module.register_forward_hook(_adder(units, context)))
        yield
    finally:
        for h in handles:
            h.remove()


def _adder(units: list, context: dict):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        x = args[0]
        result = output
        for unit in units:
            result = result + unit.variant.eager(unit, x.to(unit.lora_A.dtype), context)
        return result.to(output.dtype)
    return hook

