"""Recognisers for parameter targets: the uses of a 3-D expert stack that mixture-of-experts layers produce.

Keys are parameter paths, as PEFT's ``target_parameters`` names them (``model.layers.0.mlp.experts.gate_up_proj``).
The forms, as torch.export or symbolic_trace record transformers' experts implementations and hand-written loops:

- ``index``:   ``F.linear(x, W[e])`` / ``x @ W[e]`` for a constant e (a Python loop over experts, unrolled);
- ``gather``:  ``bmm(W[ids], x[:, :, None])`` / ``bmm(x[:, None], W[ids])`` (transformers' ``batched_mm``);
- ``grouped``: ``grouped_mm(x_sorted, W.transpose(-2, -1), offsets)`` (``grouped_mm``: ``ops.grouped.grouped_mm``
  where capture swapped transformers' fallback op, ``torch._grouped_mm`` as CUDA bf16 records it);
- ``linear``:  a 2-D weight any linear recogniser found (``lin.weight``): the same node under its parameter's key,
  with PEFT's factoring of the stored weight (``ΔW = s·B A`` with A ``[r, W.shape[1]]``, whatever the op does).

Whether W is stored ``[E, out, in]`` or ``[E, in, out]`` is the owning module's ``is_transposed`` (PEFT's rule).

Example::

    [t for t in find_targets(gm.graph, gm, model) if t.kind == "param"]
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..kinds import PARAM, ParamGeometry
from ..ops.grouped import grouped_mm
from .core import Context, Target, alias, arg, recogniser

aten = torch.ops.aten

_SELECT = (aten.select.int, torch.select)
_INDEX = (aten.index.Tensor, operator.getitem)
_LINEAR = (F.linear, aten.linear.default)
_MATMUL = (torch.matmul, operator.matmul, aten.matmul.default, aten.mm.default, torch.mm)
_BMM = (torch.bmm, aten.bmm.default)
_GROUPED_NAMES = ("lora_fx::grouped_mm", "transformers::grouped_mm_fallback", "aten::_grouped_mm")


def _grouped_op(target) -> bool:
    name = getattr(target, "name", None)
    name = name() if callable(name) and isinstance(target, torch._ops.OpOverload) else ""
    return name in _GROUPED_NAMES or target in (grouped_mm, getattr(torch, "_grouped_mm", None),
                                                getattr(F, "grouped_mm", None))


def _stack(ctx: Context, node) -> tuple[str, nn.Parameter] | None:
    found = ctx.param_of(node)
    return found if found is not None and found[1].dim() == 3 else None


def _geometry(ctx: Context, path: str, p: nn.Parameter, form: str, use_t: bool, **kw) -> ParamGeometry:
    """PEFT's in/out of a 3-D stack: ``[E, out, in]`` unless its module says ``is_transposed`` (``[E, in, out]``)."""
    owner = ctx.source_module(path.rpartition(".")[0]) or ctx.module(path.rpartition(".")[0])
    stored_t = bool(getattr(owner, "is_transposed", False))
    e, d1, d2 = p.shape
    in_f, out_f = (d1, d2) if stored_t else (d2, d1)
    return ParamGeometry(e, in_f, out_f, form, stored_t, use_t, **kw)


def _target(ctx, node, path, p, geometry, at, op) -> Target:
    return Target(path, PARAM, geometry, node.name, at, path, f"{op} (E={geometry.experts})")


def _selected(ctx: Context, w) -> tuple[str, nn.Parameter, int] | None:
    """(path, stack, e) when ``w`` is ``W[e]`` / ``W.select(0, e)`` of a 3-D parameter with a constant e."""
    if not isinstance(w, fx.Node) or w.op not in ("call_function", "call_method"):
        return None
    if w.target in _SELECT or w.target == "select":
        dim, e = arg(w, 1, "dim"), arg(w, 2, "index")
    elif w.target is operator.getitem:
        dim, e = 0, w.args[1]
    else:
        return None
    found = _stack(ctx, w.args[0])
    if found is None or dim != 0 or not isinstance(e, int) or isinstance(e, bool):
        return None
    return (*found, e)


@recogniser
def expert_index(ctx: Context, node: fx.Node) -> Target | None:
    """``F.linear(x, W[e])`` (W[e] ``[out, in]``) or ``x @ W[e]`` (``[in, out]``) for a constant expert e."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        use_t, w = False, arg(node, 1, "weight")
    elif node.target in _MATMUL:
        use_t, w = True, arg(node, 1, "other")
    else:
        return None
    found = _selected(ctx, w)
    if found is None or not isinstance(arg(node, 0, "input"), fx.Node):
        return None
    path, p, e = found
    geometry = replace(_geometry(ctx, path, p, "index", use_t), index=e)
    op = ("F.linear" if not use_t else "matmul") + f" on {path.rpartition('.')[2]}[{e}]"
    return _target(ctx, node, path, p, geometry, (0, "input"), op)


def _gathered(ctx: Context, w) -> tuple[str, nn.Parameter] | None:
    """(path, stack) when ``w`` is ``W[ids]`` for a 3-D parameter and a tensor of expert ids."""
    if not isinstance(w, fx.Node) or w.op != "call_function" or w.target not in _INDEX:
        return None
    index = w.args[1]
    if isinstance(index, (list, tuple)):
        index = index[0] if len(index) == 1 else None
    if not isinstance(index, fx.Node):
        return None
    return _stack(ctx, w.args[0])


@recogniser
def expert_gather(ctx: Context, node: fx.Node) -> Target | None:
    """``bmm(W[ids], x)`` (column vectors, W ``[E, out, in]``) or ``bmm(x, W[ids])`` (row vectors, ``[E, in, out]``)."""
    if node.op != "call_function" or node.target not in _BMM:
        return None
    left, right = node.args[0], node.args[1]
    if (found := _gathered(ctx, left)) is not None:
        use_t, at, weight_at = False, (1, "mat2"), 0
    elif (found := _gathered(ctx, right)) is not None:
        use_t, at, weight_at = True, (0, "input"), 1
    else:
        return None
    path, p = found
    geometry = _geometry(ctx, path, p, "gather", use_t, weight_at=weight_at)
    return _target(ctx, node, path, p, geometry, at, "bmm on gathered experts")


@recogniser
def expert_grouped(ctx: Context, node: fx.Node) -> Target | None:
    """``grouped_mm(x, W.transpose(-2, -1), offsets)`` (W ``[E, out, in]``) or ``grouped_mm(x, W, offsets)``."""
    if node.op != "call_function" or not _grouped_op(node.target) or len(node.args) < 2:
        return None
    w = node.args[1]
    found, use_t = _stack(ctx, w), True
    if found is None and isinstance(w, fx.Node) and w.op in ("call_function", "call_method"):
        dims = tuple(d % 3 for d in w.args[1:3] if isinstance(d, int))
        if w.target in (torch.transpose, aten.transpose.int, "transpose") and sorted(dims) == [1, 2]:
            found, use_t = _stack(ctx, w.args[0]), False
    if found is None:
        return None
    path, p = found
    geometry = _geometry(ctx, path, p, "grouped", use_t)
    return _target(ctx, node, path, p, geometry, (0, "input"), "grouped_mm over experts")


@alias
def linear_weight(ctx: Context, t: Target) -> Target | None:
    """A linear target's 2-D weight as a parameter target (PEFT's ``target_parameters=["lin.weight"]``)."""
    g = t.geometry
    if t.kind != "linear" or g.left or g.rows is not None or g.quant or t.weight == t.key:
        return None  # (a functional weight's linear key is its path already: one key, one kind)
    out_f, in_f = (g.in_features, g.out_features) if g.transposed else (g.out_features, g.in_features)
    geometry = ParamGeometry(1, in_f, out_f, "linear", False, g.transposed, index=0)
    return replace(t, key=t.weight, strategy=PARAM, geometry=geometry, op=f"{t.op} (parameter)")
