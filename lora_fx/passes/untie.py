"""untie_merged: a merged key whose weight has other uses (GPT-2's tied ``wte``/``lm_head``) reads its own merged
copy, so the other uses keep W (``call_module`` forms get the copy as their module's weight instead: ``fold``).

Example::

    records = untie_merged(graph, ctx)      # get_attr wte.weight -> get_attr lora_merged.lm_head (for lm_head)
"""

from __future__ import annotations

from torch import fx

from .pipeline import Action, GraphContext, Record, node_map


def untie_merged(graph: fx.Graph, ctx: GraphContext) -> list[Record]:
    nodes, records = node_map(graph), []
    for t in ctx.targets:
        node = nodes[t.node]
        if node.op == "call_module":
            continue
        with graph.inserting_before(node):
            copy_node = ctx.inputs.weight(t)
        if copy_node is None:
            continue
        old = next(a for a in (*node.args, *node.kwargs.values())
                   if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == t.weight)
        node.replace_input_with(old, copy_node)
        if not old.users:
            graph.erase_node(old)
        records.append(Record("untie_merged", Action.UNTIED, t.key))
    return records
