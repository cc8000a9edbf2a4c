"""Capturing transformers' mixture-of-experts layers: the experts implementation torch.export can record, and the
grouped matrix product it records put back on torch's native kernel.

- ``eager`` experts loop over the experts the router hit, a data-dependent Python loop torch.export cannot record;
  while exporting, such models compute their experts with ``grouped_mm`` (the same function: each token through
  its own experts), transformers' default.
- export traces as torch.compile does, so transformers records float32 ``grouped_mm`` as its Python-loop
  fallback op; ``native_grouped`` swaps those nodes for ``ops.grouped.grouped_mm``, which runs the native kernel
  in eager and is one opaque op under compile.

Example::

    with traceable_experts(model):
        ep = torch.export.export(model, args, strict=False)
    native_grouped(ep.module().graph)
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from ..ops.grouped import grouped_mm

FALLBACK = "transformers::grouped_mm_fallback"


@contextlib.contextmanager
def traceable_experts(model: nn.Module):
    """Models whose experts use transformers' ``eager`` loop compute them with ``grouped_mm`` while exporting."""
    configs = {id(c): c for m in model.modules() if hasattr(m, "is_concatenated")
               and getattr(c := getattr(m, "config", None), "_experts_implementation", None) == "eager"}
    for c in configs.values():
        c._experts_implementation = "grouped_mm"
    try:
        yield
    finally:
        for c in configs.values():
            c._experts_implementation = "eager"


def native_grouped(graph: fx.Graph) -> int:
    """Swap transformers' ``grouped_mm_fallback(x, w, offsets)`` nodes for ``ops.grouped.grouped_mm``; returns how
    many (node names are kept, so targets found before and after agree)."""
    swapped = 0
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and (
                node.target.name() == FALLBACK):
            node.target = grouped_mm
            swapped += 1
    return swapped

