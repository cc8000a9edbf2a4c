"""The merge as a fold of the adapter state into the base weights: ``W' = W + Σ s·ΔW`` computed in float32 and cast
back once (each variant may rescale: DoRA), planned aside and written by the verb's transaction.

All that a merge changes lives in one ``MergeState``: which adapters are merged, and per key how to undo it
(an exact copy of W, or ΔW to subtract), the base bias a LoRA bias was folded into, and for a weight with
uses no adapter targets (GPT-2's tied ``wte``/``lm_head``) the key's own merged copy, so the other uses keep
W. Graph forms that read the weight with ``get_attr`` are redirected to the copy by the rebuild
(``MergeState.untied``); ``call_module`` forms get the copy as their module's weight. The LoRA branches
themselves disappear because the rebuild leaves the merged adapters out.

Example::

    plan = plan_fold(cap, targets_by_key, units_by_key, ["default"], safe=True)   # nothing written
    apply(plan, tx)                                                                # written, undoable
    apply(plan_unfold(cap, plan.state), tx)                                        # W back, bit for bit
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import MergeError
from .common import ident

HOLDER = "lora_merged"  # graph-module attribute holding the merged copies of untied weights


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32, or the weight's own dtype when it is wider (float64)."""
    return torch.promote_types(weight_dtype, torch.float32)


@dataclass(frozen=True)
class Folded:
    """What unfold needs to undo one key's merge."""

    key: str
    param: nn.Parameter  # the base weight the key read before merging
    original: torch.Tensor | None = None  # exact copy of W (in-place merges)
    deltas: torch.Tensor | None = None  # Σ s·ΔW, when no copy was kept
    factor: torch.Tensor | None = None  # a variant's per-output factor (DoRA), when no copy was kept
    untied: nn.Parameter | None = None  # the key's own merged copy (shared weights)
    bias: nn.Parameter | None = None  # the base bias a LoRA bias was folded into
    bias_original: torch.Tensor | None = None
    modules: tuple[tuple[nn.Module, nn.Parameter], ...] = ()  # (module, its old weight) given the copy


@dataclass(frozen=True)
class MergeState:
    adapters: tuple[str, ...]
    folds: tuple[Folded, ...]

    @property
    def untied(self) -> dict[str, str]:
        """key -> attribute path (from the graph module) of its merged copy."""
        return {f.key: f"{HOLDER}.{ident(f.key)}" for f in self.folds if f.untied is not None}


@dataclass
class Writes:
    """What a fold or unfold writes: in-place copies ``(tensor, value, exact old value or None)``, module weights to
    point elsewhere ``(module, parameter)``, and merged copies to add to (or drop from) the holder."""

    copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    weights: list[tuple[nn.Module, nn.Parameter]] = field(default_factory=list)
    holder: list[tuple[str, nn.Parameter | None]] = field(default_factory=list)
    state: MergeState | None = None  # the merge state after these writes (None: nothing merged)


def plan_fold(cap: Any, targets: dict[str, list], units_by_key: dict[str, list], adapters: list[str], *,
              safe: bool = False, keep_original: bool = True, progress: Callable[[str], None] | None = None,
              in_place: set[str] | frozenset[str] = frozenset()) -> Writes:
    """Everything merging ``units_by_key`` (key -> [(adapter, unit)]) into the weights writes, computed aside.
    ``safe``: refuse non-finite results. ``keep_original``: keep an exact copy of W for unfold. ``in_place``: keys
    whose shared weight takes the merge itself (its other uses follow: ``ensure_weight_tying``)."""
    out, folds = Writes(), []
    for key, units in units_by_key.items():
        ts = targets[key]
        why = ts[0].strategy.refusal(ts[0].geometry, "merging")
        if why:
            raise MergeError(f"{key!r} cannot be merged: {why}.")
        if len(units) > 1 and not all(u.variant.stacks for _, u in units):
            lone = next(u for _, u in units if not u.variant.stacks)
            raise MergeError(f"{key!r} has a {lone.variant.label} adapter and other adapters active; merge them one "
                             "at a time.")
        w = cap.weight(ts[0])
        dtype = merge_dtype(w.dtype)
        w32 = w.detach().to(dtype)
        delta = sum(u.variant.delta(u, dtype) for _, u in units)
        factor = units[0][1].variant.merge_factor(units[0][1], w32) if len(units) == 1 else None
        merged = w32 + delta
        merged = (merged * factor if factor is not None else merged).to(w.dtype)
        if safe and not torch.isfinite(merged).all():
            raise MergeError(f"Merging adapter(s) {[a for a, _ in units]} into {key!r} gives non-finite weights; "
                             f"nothing was merged. Check the lora_A / lora_B of {key!r} for inf or NaN.")
        bias, merged_bias = _bias_merge(cap, key, ts[0], units)
        if safe and merged_bias is not None and not torch.isfinite(merged_bias).all():
            raise MergeError(f"Merging lora_B's bias into {key!r} gives non-finite values; nothing was merged.")
        if ts[0].shared and key not in in_place:
            f = _untie(cap, key, ts, w, merged, out)
        else:
            original = w.detach().clone() if keep_original else None
            f = Folded(key, w, original=original, deltas=None if keep_original else delta,
                       factor=None if keep_original else factor)
            out.copies.append((w, merged, original))
        if bias is not None:
            f = replace(f, bias=bias, bias_original=bias.detach().clone())
            out.copies.append((bias, merged_bias, f.bias_original))
        folds.append(f)
        if progress is not None:
            progress(key)
    out.state = MergeState(tuple(adapters), tuple(folds))
    return out


def plan_unfold(cap: Any, state: MergeState) -> Writes:
    """Everything undoing ``state`` writes: each weight restored (and shared ones re-tied). Without the originals
    (``keep_original=False``) a low-precision weight is recomputed as ``W' - s·ΔW`` and rounded again: a warning
    says so, since repeated cycles drift."""
    lossy = sorted({f.key for f in state.folds if f.original is None and f.untied is None
                    and f.param.dtype in (torch.float16, torch.bfloat16)})
    if lossy:
        warnings.warn(f"unmerge() recomputes {len(lossy)} {state.folds[0].param.dtype} weights (e.g. {lossy[0]!r}) "
                      "as W' - s·ΔW without the originals (merge(keep_original=False)); each cycle rounds them "
                      "again and repeated cycles drift. merge(keep_original=True) restores them bit for bit.",
                      stacklevel=4)
    out = Writes()
    for f in state.folds:
        if f.bias is not None:
            out.copies.append((f.bias, f.bias_original, None))
        if f.untied is not None:
            out.weights += [(module, old) for module, old in f.modules]
            out.holder.append((ident(f.key), None))
            continue
        if f.original is not None:
            out.copies.append((f.param, f.original, None))
        else:
            w = f.param.detach().to(merge_dtype(f.param.dtype))
            if f.factor is not None:
                w = w / f.factor
            out.copies.append((f.param, (w - f.deltas).to(f.param.dtype), None))
    return out


def apply(writes: Writes, tx: Any, gm: nn.Module) -> None:
    """Make ``writes`` live through the transaction ``tx``."""
    if any(p is not None for _, p in writes.holder) and not hasattr(gm, HOLDER):
        tx.add_module(gm, HOLDER, nn.Module())
    for name, param in writes.holder:
        tx.register_parameter(getattr(gm, HOLDER), name, param)
    for module, param in writes.weights:
        tx.setattr(module, "weight", param)
    for tensor, value, old in writes.copies:
        tx.copy_(tensor, value, old)


def _untie(cap: Any, key: str, ts: list, w: nn.Parameter, merged: torch.Tensor, out: Writes) -> Folded:
    """A shared weight's merged copy: a new Parameter the key's own uses read (module forms get it as their weight;
    the wrapped model's module too, so the original model computes the merged weights)."""
    gm = cap.graph_module
    copy = nn.Parameter(merged, requires_grad=False)
    modules: list[tuple[nn.Module, nn.Parameter]] = []
    for t in ts:
        if cap.pristine_node(t).op == "call_module":  # the module reads its own weight: give it the copy
            module = gm.get_submodule(t.weight_path.rpartition(".")[0])
            if not any(m is module for m, _ in modules):
                modules.append((module, module.weight))
    owner = _module_or_none(cap.source, key)
    if owner is not None and getattr(owner, "weight", None) is w and not any(m is owner for m, _ in modules):
        modules.append((owner, w))
    out.holder.append((ident(key), copy))
    out.weights += [(m, copy) for m, _ in modules]
    return Folded(key, w, untied=copy, modules=tuple(modules))


def _bias_merge(cap: Any, key: str, t: Any, units: list) -> tuple:
    """(base bias, base bias + Σ s·b) for units whose variant adds to the bias, or (None, None)."""
    parts = [(u, u.variant.bias_delta(u, torch.float32)) for _, u in units]
    parts = [(u, d) for u, d in parts if d is not None]
    if not parts:
        return None, None
    bias = cap.bias_param(t)
    if bias is None:
        raise MergeError(f"{key!r} has no base bias to fold lora_B's bias into (PEFT cannot merge this either); "
                         "keep the adapter unmerged.")
    dtype = merge_dtype(bias.dtype)
    merged = bias.detach().to(dtype) + sum(u.variant.bias_delta(u, dtype) for u, _ in parts)
    return bias, merged.to(bias.dtype)


def _module_or_none(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
