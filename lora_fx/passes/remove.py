"""Remove pass: erase every node the insert pass added, reconnecting users to the base outputs.

Example::

    remove_lora(gm)   # gm computes the base model again; adapter weights stay in the store
"""

from __future__ import annotations

from torch import fx

from .common import TAG, finish


def remove_lora(gm: fx.GraphModule) -> int:
    """Undo ``insert_lora``; returns how many nodes were erased."""
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    tagged = [n for n in g.nodes if TAG in n.meta and n.meta[TAG].get("role") in ("branch", "out")]
    for node in tagged:
        if node.meta[TAG]["role"] == "out":
            node.replace_all_uses_with(by_name[node.meta[TAG]["base"]])
    namespace = getattr(g, "_graph_namespace", None)
    for node in reversed(tagged):
        g.erase_node(node)
        # fx never frees a name; freeing it keeps node names stable across remove/insert cycles.
        getattr(namespace, "_used_names", set()).discard(node.name)
    if tagged:
        finish(gm)
    return len(tagged)

