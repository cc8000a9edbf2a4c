"""Binding a call to the model's own ``forward`` signature, and the key a captured graph is specialised on.

A call's key is which arguments it passes (by name, ``**kwargs`` flattened, ``None`` dropped), each tensor's dtype,
rank and size-1 dimensions (export makes a size-1 dimension static) and the value of every non-tensor argument.
The binding is plain dictionary work (no ``inspect`` at call time), so ``torch.compile`` traces through it.

Example::

    sig = CallSignature.of(model)
    call = sig.bind((ids,), {"labels": ids})     # {"input_ids": ids, "labels": ids}
    key = call_key(call)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import CaptureError

LOSS_KWARGS = ("num_items_in_batch",)  # values that change every batch: passed as tensors, not baked in


@dataclass(frozen=True)
class CallSignature:
    model: str
    names: tuple[str, ...]  # parameters that can be passed by position, in order
    var_keyword: str | None
    var_positional: str | None = None  # ``*args``: the extra positional values, as one tuple under its name

    @classmethod
    def of(cls, model: nn.Module) -> CallSignature:
        params = inspect.signature(model.forward).parameters.values()
        names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        var_pos = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
        return cls(type(model).__name__, names, var_kw, var_pos)

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, without ``None``s; integer loss kwargs as tensors."""
        if len(args) > len(self.names) and self.var_positional is None:
            raise CaptureError(f"{self.model}.forward takes at most {len(self.names)} positional arguments "
                               f"({', '.join(self.names)}), got {len(args)}.")
        call = dict(zip(self.names, args))
        if len(args) > len(self.names):
            call[self.var_positional] = tuple(args[len(self.names):])
        for name, value in kwargs.items():
            if name in call:
                raise CaptureError(f"{self.model}.forward got {name!r} both by position and by name.")
            if name not in self.names and self.var_keyword is None:
                raise CaptureError(f"{self.model}.forward has no parameter {name!r}; it takes "
                                   f"{', '.join(self.names)}.")
            call[name] = value
        for name in LOSS_KWARGS:
            if isinstance(call.get(name), int) and not isinstance(call[name], bool):
                call[name] = torch.tensor(call[name])
        _positions_to_keep(call)
        return {name: value for name, value in call.items() if value is not None}


def _positions_to_keep(call: dict[str, Any]) -> None:
    """transformers' ``logits_to_keep=k`` (the last k positions) as the index tensor it also accepts, so each k is
    data, not a graph of its own (0, every position, stays as it is)."""
    k = call.get("logits_to_keep")
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        return
    seq = next((call[n] for n in ("input_ids", "inputs_embeds") if isinstance(call.get(n), torch.Tensor)
                and call[n].dim() >= 2), None)
    if seq is not None:
        length = seq.shape[1]
        call["logits_to_keep"] = torch.arange(max(length - k, 0), length, device=seq.device)


def call_key(call: dict[str, Any]) -> tuple:
    """What a graph captured for ``call`` is specialised on (see the module docstring)."""
    return tuple(sorted((name, _leaf_key(value)) for name, value in call.items()))


def _leaf_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    leaves, spec = pytree.tree_flatten(value)
    return str(spec), tuple(_tensor_key(v) if isinstance(v, torch.Tensor) else ("value", repr(v)) for v in leaves)


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.dtype, t.dim(), tuple(d for d, size in enumerate(t.shape) if size == 1)
