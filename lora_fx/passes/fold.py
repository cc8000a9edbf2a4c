"""Fold pass (merge): ``W' = W + Σ s·ΔW`` computed in float32 and cast back once; unfold restores W.

A weight that also has uses no adapter targets (GPT-2's tied ``wte``/``lm_head``) is never changed in
place: the targeted use gets its own merged copy (the tie is broken for it alone) and the other uses keep
W. The LoRA branches themselves are erased by the model rebuilding its graph without the merged adapters.

Example::

    folded = fold_weights(gm, source_model, targets, units_by_key, safe=True)
    ...
    unfold_weights(gm, folded)   # weights back to W (bitwise, from the kept copy)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import MergeError
from ..ops import delta_weight, dora_factor, merge_dtype
from ..store import LoraUnit
from ..targets import Target, arg, weight_uses
from .common import TAG, finish


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
    rewired: list[tuple[fx.Node, fx.Node, str]] = field(default_factory=list)  # (node, new input, old get_attr target)


def fold_weights(
    gm: fx.GraphModule,
    source: nn.Module,
    targets: list[Target],
    units_by_key: dict[str, list[tuple[str, LoraUnit]]],
    *,
    safe: bool = False,
    keep_original: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Folded]:
    """Merge each key's units into its weight. ``safe``: compute everything first, check it is finite, and
    only then commit (on failure nothing changed). ``keep_original``: keep an exact copy of W for unfold.
    ``progress`` is called with each key once it is merged."""
    by_key: dict[str, list[Target]] = {}
    for t in targets:
        if t.key in units_by_key:
            by_key.setdefault(t.key, []).append(t)
    uses = weight_uses(gm)
    plans = []
    for key, ts in by_key.items():
        w = gm.get_parameter(ts[0].weight_path)
        dtype = merge_dtype(w.dtype)
        units = units_by_key[key]
        delta = sum(delta_weight(u, ts[0].layout, w.shape, dtype) for _, u in units)
        factor = None
        if any(u.use_dora for _, u in units):
            if len(units) > 1:
                raise MergeError(f"{key!r} has a DoRA adapter and other adapters active; merge them one at a time.")
            factor = dora_factor(units[0][1], w.detach().to(dtype), ts[0].layout)  # W' = m/‖W+ΔW‖ · (W+ΔW)
        merged = w.detach().to(dtype) + delta
        merged = (merged * factor if factor is not None else merged).to(w.dtype)
        if safe and not torch.isfinite(merged).all():
            names = [a for a, _ in units_by_key[key]]
            raise MergeError(f"Merging adapter(s) {names} into {key!r} gives non-finite weights; nothing was merged. "
                             f"Check the lora_A / lora_B of {key!r} for inf or NaN.")
        shared = uses.get(id(w), 0) > len(ts)
        bias, merged_bias = _bias_merge(gm, key, ts[0], units)
        if safe and merged_bias is not None and not torch.isfinite(merged_bias).all():
            raise MergeError(f"Merging lora_B's bias into {key!r} gives non-finite values; nothing was merged.")
        plans.append((key, ts, w, merged, delta, factor, shared, bias, merged_bias))
    folded = []
    for key, ts, w, merged, delta, factor, shared, bias, merged_bias in plans:
        if shared:
            f = _untie(gm, source, key, ts, w, merged)
        else:
            f = Folded(key, w, original=w.detach().clone() if keep_original else None,
                       deltas=None if keep_original else delta, factor=None if keep_original else factor)
            with torch.no_grad():
                w.copy_(merged)
        if bias is not None:
            f.bias, f.bias_original = bias, bias.detach().clone()
            with torch.no_grad():
                bias.copy_(merged_bias)
        folded.append(f)
        if progress is not None:
            progress(key)
    finish(gm)
    return folded


def unfold_weights(gm: fx.GraphModule, folded: list[Folded]) -> None:
    """Undo ``fold_weights``: restore each weight (and re-tie shared ones)."""
    for f in folded:
        if f.bias is not None:
            with torch.no_grad():
                f.bias.copy_(f.bias_original)
        if f.untied is not None:
            for module, old in f.modules:
                module.weight = old
            for node, new, old_target in f.rewired:
                with gm.graph.inserting_before(node):  # the old get_attr may have been removed as dead code
                    old = gm.graph.get_attr(old_target)
                node.replace_input_with(new, old)
                if not new.users:
                    gm.graph.erase_node(new)
            gm._parameters.pop(_attr_name(f.key), None)
            continue
        with torch.no_grad():
            if f.original is not None:
                f.param.copy_(f.original)
            else:
                w = f.param.detach().to(merge_dtype(f.param.dtype))
                if f.factor is not None:
                    w = w / f.factor
                f.param.copy_((w - f.deltas).to(f.param.dtype))
    finish(gm)


def _untie(gm: fx.GraphModule, source: nn.Module, key: str, ts: list[Target], w: nn.Parameter,
           merged: torch.Tensor) -> Folded:
    copy = nn.Parameter(merged, requires_grad=False)
    f = Folded(key, w, untied=copy)
    name = _attr_name(key)
    for t in ts:
        if t.node.op == "call_module":
            module = gm.get_submodule(t.node.target)
            if not any(m is module for m, _ in f.modules):
                f.modules.append((module, module.weight))
                module.weight = copy
            continue
        old = _weight_arg(t)
        if not hasattr(gm, name):
            gm.register_parameter(name, copy)
        with gm.graph.inserting_before(t.node):
            new = gm.graph.get_attr(name)
        new.meta[TAG] = {"role": "untied", "key": key}
        t.node.replace_input_with(old, new)
        f.rewired.append((t.node, new, old.target))
    owner = _module_or_none(source, key)
    if owner is not None and getattr(owner, "weight", None) is w:
        f.modules.append((owner, w))
        owner.weight = copy  # write-back: the original model computes the merged weights too
    return f


def _bias_merge(gm: fx.GraphModule, key: str, t: Target, units: list) -> tuple:
    """(base bias, base bias + Σ s·b_B) for lora_bias units, or (None, None)."""
    with_bias = [u for _, u in units if u.lora_B_bias is not None]
    if not with_bias:
        return None, None
    where = t.extra.get("bias")
    node = arg(t.node, *where[1]) if where and where[0] == "arg" else None
    path = where[1] if where and where[0] == "attr" else getattr(node, "target", None)
    if path is None or (node is not None and node.op != "get_attr"):
        raise MergeError(f"{key!r} has no base bias to fold lora_B's bias into (PEFT cannot merge this either); "
                         "keep the adapter unmerged.")
    bias = gm.get_parameter(path)
    dtype = merge_dtype(bias.dtype)
    merged = bias.detach().to(dtype) + sum(u.scaling * u.lora_B_bias.detach().to(dtype) for u in with_bias)
    return bias, merged.to(bias.dtype)


def _weight_arg(t: Target) -> fx.Node:
    for a in (*t.node.args, *t.node.kwargs.values()):
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == t.weight_path:
            return a
    raise MergeError(f"Cannot find the weight input of node {t.node.name!r} ({t.key!r}) to untie it.")


def _attr_name(key: str) -> str:
    return re.sub(r"\W", "_", key) + "_weight_merged"


def _module_or_none(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
