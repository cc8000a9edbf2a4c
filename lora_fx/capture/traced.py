"""Capture with ``torch.fx.symbolic_trace``, keeping repeated blocks as ``call_module`` nodes.

Each block member is traced on its own (fx tracing is cheap); members whose graphs are the same share one
template. Each block call is bound to the member's ``forward`` signature and passed fully positionally, so the
adapter inputs a block program reads can follow. A model whose blocks cannot be traced alone, or whose block
``forward`` takes ``*args`` / ``**kwargs``, is traced in one piece.

Example::

    gm, templates, blocks = trace_with_blocks(mlp_stack)
"""

from __future__ import annotations

import inspect

from torch import fx, nn

from .blocks import Block, Template, install_blocks
from .repeats import repeated_blocks


class _BlockTracer(fx.Tracer):
    def __init__(self, blocks: set[str]) -> None:
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.blocks or super().is_leaf_module(m, qualname)


def trace_with_blocks(model: nn.Module) -> tuple[fx.GraphModule, dict[str, Template], dict[str, Block]]:
    """(GraphModule, templates by id, blocks by path); blocks are empty when the model has none to keep."""
    templates = _block_templates(model)
    if not templates:
        return fx.symbolic_trace(model), {}, {}
    members = {m: t for t in templates.values() for m in t.members}
    tracer = _BlockTracer(set(members))
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in members:
            node.args, node.kwargs = _positional(model.get_submodule(node.target), node.args, node.kwargs), {}
    gm.recompile()
    blocks = install_blocks(gm, model, templates)
    return gm, templates, blocks


def _block_templates(model: nn.Module) -> dict[str, Template]:
    templates: dict[str, Template] = {}
    for group in repeated_blocks(model):
        by_code: dict[str, Template] = {}
        for path in group:
            member = model.get_submodule(path)
            if not _fixed_signature(member):
                return {}
            try:
                traced = fx.symbolic_trace(member)
            except Exception:
                return {}
            for node in traced.graph.nodes:
                if node.op == "placeholder":
                    node.args = ()  # every input is passed positionally
            traced.recompile()
            t = by_code.get(traced.code)
            if t is None:
                t = by_code[traced.code] = Template(path, traced.graph, traced, [])
            t.members.append(path)
        templates.update({t.id: t for t in by_code.values()})
    return templates


def _fixed_signature(module: nn.Module) -> bool:
    kinds = {p.kind for p in inspect.signature(module.forward).parameters.values()}
    return not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())
