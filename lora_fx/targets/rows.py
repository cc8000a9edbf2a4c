"""Rows of a weight read by an op: ``nn.MultiheadAttention`` chunks its packed ``in_proj_weight`` into q, k and v
(unbatched or cross-attention calls), and a functional model may slice ``W[a:b]``. Each such op is a linear
target on the whole weight's key that reads rows ``[start, stop)`` (``LinearGeometry.rows``).

Example::

    row_slice_of(ctx, node)   # ("mha.in_proj_weight", Parameter [48, 16], (16, 32)) for chunk(W, 3)[1]
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from .core import Context, arg

aten = torch.ops.aten

_CHUNKS = (aten.chunk.default, torch.chunk, aten.split.Tensor, aten.split_with_sizes.default, torch.split,
           aten.split.sizes)


def row_slice_of(ctx: Context, node: Any) -> tuple[str, nn.Parameter, tuple[int, int]] | None:
    """``(path, parameter, (start, stop))`` when ``node`` is rows of a 2-D parameter: an item of its ``chunk`` /
    ``split`` / ``split_with_sizes`` along dim 0 (MultiheadAttention's q/k/v), or ``W[a:b]`` / ``aten.slice``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        found, sl = ctx.param_of(node.args[0]), node.args[1]
        if found is None or found[1].dim() != 2 or sl.step not in (None, 1):
            return None
        start, stop, _ = sl.indices(found[1].shape[0])
        return (*found, (start, stop)) if stop > start else None
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        found = ctx.param_of(node.args[0])
        dim, start, stop, step = (list(node.args[1:]) + [None] * 4)[:4]
        dim, step = dim or 0, step or 1
        if found is None or found[1].dim() != 2 or dim != 0 or step != 1:
            return None
        start, stop, _ = slice(start, stop).indices(found[1].shape[0])
        return (*found, (start, stop)) if stop > start else None
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
        return None
    split, index = node.args
    if not isinstance(split, fx.Node):
        return None
    if split.op == "call_function" and split.target in _CHUNKS or split.op == "call_method" and split.target in (
            "chunk", "split"):
        found = ctx.param_of(split.args[0])
        if found is None or found[1].dim() != 2 or arg(split, 2, "dim", 0) not in (0, -2):
            return None
        bounds = _pieces(split, found[1].shape[0])
        return (*found, bounds[index]) if bounds is not None and index < len(bounds) else None
    return None


def _pieces(split: fx.Node, rows: int) -> list[tuple[int, int]] | None:
    """The row ranges a chunk / split node cuts ``rows`` rows into."""
    how = split.args[1] if len(split.args) > 1 else split.kwargs.get("chunks", split.kwargs.get("split_size"))
    is_chunk = split.target in (aten.chunk.default, torch.chunk, "chunk")
    if isinstance(how, int):
        size = -(-rows // how) if is_chunk else how
        sizes = [min(size, rows - i) for i in range(0, rows, size)]
    elif isinstance(how, (list, tuple)) and all(isinstance(v, int) for v in how) and sum(how) == rows:
        sizes = list(how)
    else:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(a, a + n) for a, n in zip(starts, sizes)]
