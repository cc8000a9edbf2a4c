"""Helpers shared by the passes: tagging inserted nodes and finishing a pass."""

from __future__ import annotations

from typing import Any

from torch import fx

TAG = "lora_fx"


def new_node(
    graph: fx.Graph, op: str, target: Any, args: tuple, name: str, tag: dict[str, Any], kwargs: dict | None = None
) -> fx.Node:
    """Create a node tagged as lora_fx's (so remove_lora can find it) at the current insert point."""
    node = graph.create_node(op, target, args, kwargs or {}, name=name)
    node.meta[TAG] = dict(tag)
    return node


def finish(gm: fx.GraphModule) -> None:
    """Dead-code removal, lint and recompile: the end of every pass."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
