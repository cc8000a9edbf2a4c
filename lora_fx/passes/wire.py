"""wire_block_calls: pass each block call the adapter tensors its program reads, in the program's input order: a
unit's tensor, the bank's stacked tensors for the key, a merged weight's own copy (``get_attr`` on the graph
module), or the route of the call (the outer graph's route node).

Example::

    records = wire_block_calls(graph, ctx)   # model.layers.3(h, ..., lora.default.model_layers_3_q_proj.lora_A, ...)
"""

from __future__ import annotations

from torch import fx

from .pipeline import Action, GraphContext, Record


def wire_block_calls(graph: fx.Graph, ctx: GraphContext) -> list[Record]:
    records = []
    for node in list(graph.nodes):
        order = ctx.block_inputs.get(node.target) if node.op == "call_module" else None
        if not order:
            continue
        extra = []
        with graph.inserting_before(node):
            for ref in order:
                if ref == "route":
                    extra.append(ctx.inputs.route())
                elif isinstance(ref, tuple) and ref[0] == "invocation":
                    extra.append(ctx.inputs.invocation_mask(ref[1]))
                else:
                    extra.append(graph.get_attr(ctx.plan.resolve(ref, f"{ctx.key_prefix}{node.target}.{ref.key}")))
        node.args = (*node.args, *extra)
        records.append(Record("wire_block_calls", Action.WIRED, node.target))
    return records
