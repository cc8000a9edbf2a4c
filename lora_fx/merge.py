"""Merge state and the fold math: ``W' = W + Σ s·ΔW`` computed in float32 and cast back once; unfold restores W.

All that a merge changes lives in one ``MergeState``: which adapters are merged, and per key how to undo it
(an exact copy of W, or ΔW to subtract), the base bias lora_B's bias was folded into, and for a weight with
uses no adapter targets (GPT-2's tied ``wte``/``lm_head``) the key's own merged copy, so the other uses keep
W. Graph forms that read the weight with ``get_attr`` are redirected to the copy by the rebuild
(``MergeState.untied``); ``call_module`` forms get the copy as their module's weight. The LoRA branches
themselves disappear because the rebuild leaves the merged adapters out.

Example::

    state = fold(cap, targets_by_key, units_by_key, ["default"], safe=True)
    ...
    unfold(state)   # weights back to W (bitwise, from the kept copy)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import Captured
from .errors import MergeError
from .passes.common import ident
from .targets import Target

HOLDER = "lora_merged"  # graph-module attribute holding the merged copies of untied weights


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32, or the weight's own dtype when it is wider (float64)."""
    return torch.promote_types(weight_dtype, torch.float32)


@dataclass
class Folded:
    """What unfold needs to undo one key's merge."""

    key: str
    param: nn.Parameter  # the base weight the key read before merging
    original: torch.Tensor | None = None  # exact copy of W (in-place merges)
    deltas: torch.Tensor | None = None  # Σ s·ΔW, when no copy was kept
    factor: torch.Tensor | None = None  # DoRA's m / ‖W + ΔW‖, when no copy was kept
    untied: nn.Parameter | None = None  # the key's own merged copy (shared weights)
    bias: nn.Parameter | None = None  # the base bias lora_B's bias was folded into (lora_bias)
    bias_original: torch.Tensor | None = None
    modules: list[tuple[nn.Module, nn.Parameter]] = field(default_factory=list)  # (module, its old weight)


@dataclass
class MergeState:
    adapters: list[str]
    folds: list[Folded]

    @property
    def untied(self) -> dict[str, str]:
        """key -> attribute path (from the graph module) of its merged copy."""
        return {f.key: f"{HOLDER}.{ident(f.key)}" for f in self.folds if f.untied is not None}


def fold(cap: Captured, targets: dict[str, list[Target]], units_by_key: dict[str, list], adapters: list[str], *,
         safe: bool = False, keep_original: bool = True,
         progress: Callable[[str], None] | None = None) -> MergeState:
    """Merge each key's units into its weight. ``safe``: compute everything first, check it is finite, and only
    then commit (on failure nothing changed). ``keep_original``: keep an exact copy of W for unfold."""
    gm = cap.graph_module
    plans = []
    for key, units in units_by_key.items():
        ts = targets[key]
        quant = getattr(ts[0].geometry, "quant", "")
        if quant:
            raise MergeError(
                f"{key!r} has a quantized base ({quant}): merging would requantize W + s·B A and lose the update's "
                "precision. Merge onto the full-precision model instead: save_pretrained(dir), then `lora-fx merge "
                "--base <full-precision model> --adapter dir --out merged` (or from_peft on that model and "
                "merge_and_unload()).")
        w = gm.get_parameter(ts[0].weight_path)
        dtype = merge_dtype(w.dtype)
        delta = sum(u.delta_weight(dtype) for _, u in units)
        factor = None
        if any(u.use_dora for _, u in units):
            if len(units) > 1:
                raise MergeError(f"{key!r} has a DoRA adapter and other adapters active; merge them one at a time.")
            factor = units[0][1].strategy.dora_factor(units[0][1], w.detach().to(dtype))  # m/‖W+ΔW‖
        merged = w.detach().to(dtype) + delta
        merged = (merged * factor if factor is not None else merged).to(w.dtype)
        if safe and not torch.isfinite(merged).all():
            raise MergeError(f"Merging adapter(s) {[a for a, _ in units]} into {key!r} gives non-finite weights; "
                             f"nothing was merged. Check the lora_A / lora_B of {key!r} for inf or NaN.")
        bias, merged_bias = _bias_merge(cap, key, ts[0], units)
        if safe and merged_bias is not None and not torch.isfinite(merged_bias).all():
            raise MergeError(f"Merging lora_B's bias into {key!r} gives non-finite values; nothing was merged.")
        plans.append((key, ts, w, merged, delta, factor, bias, merged_bias))
    folds = []
    for key, ts, w, merged, delta, factor, bias, merged_bias in plans:
        if ts[0].shared:
            f = _untie(cap, key, ts, w, merged)
        else:
            f = Folded(key, w, original=w.detach().clone() if keep_original else None,
                       deltas=None if keep_original else delta, factor=None if keep_original else factor)
            with torch.no_grad():
                w.copy_(merged)
        if bias is not None:
            f.bias, f.bias_original = bias, bias.detach().clone()
            with torch.no_grad():
                bias.copy_(merged_bias)
        folds.append(f)
        if progress is not None:
            progress(key)
    return MergeState(list(adapters), folds)


def unfold(cap: Captured, state: MergeState) -> None:
    """Undo ``fold``: restore each weight (and re-tie shared ones). Without the originals
    (``keep_original=False``) a low-precision weight is recomputed as ``W' - s·ΔW`` and rounded again: a
    warning says so, since repeated cycles drift."""
    holder = getattr(cap.graph_module, HOLDER, None)
    lossy = sorted({f.key for f in state.folds if f.original is None and f.untied is None
                    and f.param.dtype in (torch.float16, torch.bfloat16)})
    if lossy:
        warnings.warn(f"unmerge() recomputes {len(lossy)} {state.folds[0].param.dtype} weights (e.g. {lossy[0]!r}) "
                      "as W' - s·ΔW without the originals (merge(keep_original=False)); each cycle rounds them "
                      "again and repeated cycles drift. merge(keep_original=True) restores them bit for bit.",
                      stacklevel=3)
    for f in state.folds:
        if f.bias is not None:
            with torch.no_grad():
                f.bias.copy_(f.bias_original)
        if f.untied is not None:
            for module, old in f.modules:
                module.weight = old
            if holder is not None:
                holder._parameters.pop(ident(f.key), None)
            continue
        with torch.no_grad():
            if f.original is not None:
                f.param.copy_(f.original)
            else:
                w = f.param.detach().to(merge_dtype(f.param.dtype))
                if f.factor is not None:
                    w = w / f.factor
                f.param.copy_((w - f.deltas).to(f.param.dtype))


def _untie(cap: Captured, key: str, ts: list[Target], w: nn.Parameter, merged: torch.Tensor) -> Folded:
    gm = cap.graph_module
    copy = nn.Parameter(merged, requires_grad=False)
    f = Folded(key, w, untied=copy)
    for t in ts:
        if cap.pristine_node(t).op == "call_module":  # the module reads its own weight: give it the copy
            module = gm.get_submodule(t.weight_path.rpartition(".")[0])
            if not any(m is module for m, _ in f.modules):
                f.modules.append((module, module.weight))
                module.weight = copy
    if not hasattr(gm, HOLDER):
        gm.add_module(HOLDER, nn.Module())
    getattr(gm, HOLDER).register_parameter(ident(key), copy)  # get_attr forms read it (rebuild)
    owner = _module_or_none(cap.source, key)
    if owner is not None and getattr(owner, "weight", None) is w and not any(m is owner for m, _ in f.modules):
        f.modules.append((owner, w))
        owner.weight = copy  # write-back: the original model computes the merged weights too
    return f


def _bias_merge(cap: Captured, key: str, t: Target, units: list) -> tuple:
    """(base bias, base bias + Σ s·b_B) for lora_bias units, or (None, None)."""
    with_bias = [u for _, u in units if u.lora_B_bias is not None]
    if not with_bias:
        return None, None
    bias = cap.bias_param(t)
    if bias is None:
        raise MergeError(f"{key!r} has no base bias to fold lora_B's bias into (PEFT cannot merge this either); "
                         "keep the adapter unmerged.")
    dtype = merge_dtype(bias.dtype)
    merged = bias.detach().to(dtype) + sum(u.scaling * u.lora_B_bias.detach().to(dtype) for u in with_bias)
    return bias, merged.to(bias.dtype)


def _module_or_none(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
