"""Routed branches: one node per target adds each batch row's own adapter's delta, read from the adapter bank.

For a target whose key the bank holds the rewritten graph computes (``routing``; the route and the stacked
tensors are graph inputs, so neither a new route nor a hot swap changes the graph)::

    x_l = row_dropout(x, route)                                   # each row's adapter's p, in training
    y'  = routed_<kind>(x_l, y, route, scales, A_bank, B_bank, (A_0, ..., A_{S-1}), (B_0, ..., B_{S-1}))

The units' own parameters ride along (None for an adapter without this key) so that gradients reach them.

Example::

    insert_routed(graph, target, node, [("a", unit_a), ("b", None)], inputs)
"""

from __future__ import annotations

from torch import fx

from ..targets import Target, arg
from .common import ident, new_node


def insert_routed(graph: fx.Graph, t: Target, node: fx.Node, slots: list, inputs) -> None:
    """Replace the uses of ``node`` by its routed sum; ``slots`` is ``(adapter, unit or None)`` in slot order."""
    x = arg(node, *t.input_at)
    stem, tag = ident(t.key), {"adapter": "bank", "key": t.key, "role": "branch"}

    def new(op, target, args, suffix, kwargs=None):
        return new_node(graph, op, target, args, f"{stem}_{suffix}", tag, kwargs)

    route = inputs.bank(t.key, "route")
    with graph.inserting_before(node.next):
        if t.strategy.reads_activation:
            x = new("call_module", inputs.bank_dropout(t.key), (x, route), "lora_dropout")
        a_units = tuple(inputs.tensor(a, t, "lora_A") if u is not None else None for a, u in slots)
        b_units = tuple(inputs.tensor(a, t, "lora_B") if u is not None else None for a, u in slots)
        bank = (route, inputs.bank(t.key, "scales"), inputs.bank(t.key, "A"), inputs.bank(t.key, "B"), a_units,
                b_units)
        out = t.strategy.emit_routed(graph, t.geometry, x, node, bank, new)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
