"""Sibling fusion: linear LoRA branches that read the same input run as one autograd op.

For siblings ``q, k, v = F.linear(x, W_q), ...`` (functional or aten linear nodes) the pass replaces the base
nodes and their branches with one node that owns the base GEMMs too::

    q_lora, k_lora, v_lora = linear_lora_group(x, None, (W_q, W_k, W_v), (b_q, b_k, b_v), (A_q, A_k, A_v),
                                               (B_q, B_k, B_v), (s, s, s))

(``linear_group``: ``h = x [A_q; A_k; A_v]ᵀ`` in one GEMM, each ``s · h_i B_iᵀ`` added into its fresh base
output, and in backward every ``dx`` term accumulated into one buffer). Siblings that are ``nn.Linear`` module
calls keep their module call (a hook may see its output) and get the branches only::

    q_lora, k_lora, v_lora = lora_linear_group(x, (q, k, v), (A_q, A_k, A_v), (B_q, B_k, B_v), (s, s, s))

Candidates are bucketed in one pass by (input node, adapter); a lone linear target is a group of one, and a
branch with dropout is alone (each branch has its own dropout mask; its branch reads ``dropout(x)``).

Eligible: linear targets in ``nn.Linear`` / ``F.linear`` / ``aten.linear`` form with exactly one branch, no
DoRA or lora_bias, whose adapter has the base weight's dtype. A sibling joins its group's first member only if
it can be moved right after it (its inputs are defined before the first member); its weight ``get_attr`` is
moved up with it when it comes later.

Example::

    records = fuse_linear(graph, [(target, node, "default", unit), ...], inputs)
"""

from __future__ import annotations

import operator
from collections import defaultdict

from torch import fx

from ..kinds import LINEAR
from ..linear_group import linear_lora_group
from ..ops import lora_linear_group
from ..targets import Target, arg
from .common import ident, new_node

FUSABLE_OPS = ("Linear", "F.linear", "aten.linear")


def fusable(t: Target, unit, base_dtype) -> bool:
    return (t.strategy is LINEAR and t.op in FUSABLE_OPS and not unit.use_dora and not unit.lora_bias
            and not unit.slices and unit.lora_A.dtype == base_dtype)


def fuse_linear(graph: fx.Graph, candidates: list[tuple[Target, fx.Node, str, object]], inputs) -> list[dict]:
    """Emit ``candidates`` (target, base node, adapter, unit), in graph order, as fused groups; one record each."""
    buckets: dict[tuple, list] = defaultdict(list)
    for c in candidates:
        t, node, adapter, unit = c
        key = (id(c),) if unit.dropout_p > 0 else (arg(node, *t.input_at), adapter)
        buckets[key].append(c)
    records = []
    for bucket in buckets.values():
        while bucket:
            group = _movable(bucket, {n: i for i, n in enumerate(graph.nodes)} if len(bucket) > 1 else {})
            bucket = [c for c in bucket if c not in group]
            grp = _emit(graph, group, inputs)
            records += [{"key": t.key, "adapter": adapter, "form": "fused", "group": grp.name,
                         "dropout": unit.dropout_p > 0, "owns_base": grp.target is linear_lora_group}
                        for t, _, adapter, unit in group]
    return records


def _movable(bucket: list, order: dict) -> list:
    """The bucket's first member plus the siblings that can be moved right after it."""
    group = [bucket[0]]
    if len(bucket) == 1:
        return group
    start = order[bucket[0][1]]
    for c in bucket[1:]:
        if all(order.get(i, -1) < start or i.op == "get_attr" for i in c[1].all_input_nodes):
            group.append(c)
    return group


def _emit(graph: fx.Graph, group: list, inputs) -> fx.Node:
    first = group[0][1]
    cursor = first
    for _, node, _, _ in group[1:]:  # bring the siblings (and any later weight get_attr) next to the first one
        for i in node.all_input_nodes:
            if i.op == "get_attr" and _comes_after(i, first):
                first.prepend(i)
        cursor.append(node)
        cursor = node
    t0, _, adapter, unit0 = group[0]
    tag = {"adapter": adapter, "key": t0.key, "role": "branch"}
    stem = ident(t0.key if adapter == "default" else f"{t0.key}_{adapter}")
    with graph.inserting_before(cursor.next):
        x = arg(first, *t0.input_at)
        if unit0.dropout_p > 0:
            x = new_node(graph, "call_module", inputs.dropout(adapter, t0), (x,), f"{stem}_lora_dropout", tag)
        a_nodes = tuple(inputs.tensor(adapter, t, "lora_A") for t, _, _, _ in group)
        b_nodes = tuple(inputs.tensor(adapter, t, "lora_B") for t, _, _, _ in group)
        ys = tuple(node for _, node, _, _ in group)
        scalings = tuple(float(unit.scaling) for _, _, _, unit in group)
        name = f"{stem}_lora_group" if len(group) > 1 else f"{stem}_lora_fused"
        if all(node.op == "call_function" for node in ys):  # the base GEMMs join the op
            base_x = arg(first, *t0.input_at)
            ws = tuple(_operand(n, 1, "weight") for n in ys)
            bs = tuple(_operand(n, 2, "bias") for n in ys)
            grp = new_node(graph, "call_function", linear_lora_group,
                           (base_x, None if x is base_x else x, ws, bs, a_nodes, b_nodes, scalings), name, tag)
        else:  # a module call stays: a hook may keep its output, so the deltas are not added into it in place
            grp = new_node(graph, "call_function", lora_linear_group, (x, ys, a_nodes, b_nodes, scalings, False),
                           name, tag)
        outs = []
        for i, (t, _, _, _) in enumerate(group):
            out_tag = {"adapter": adapter, "key": t.key, "role": "out"}
            s = ident(t.key if adapter == "default" else f"{t.key}_{adapter}")
            outs.append(new_node(graph, "call_function", operator.getitem, (grp, i), f"{s}_lora", out_tag))
    for (_, node, _, _), out in zip(group, outs):
        node.replace_all_uses_with(out, delete_user_cb=lambda user, grp=grp: user is not grp)
        if grp.target is linear_lora_group:
            graph.erase_node(node)
    return grp


def _operand(node: fx.Node, pos: int, name: str):
    """A linear node's weight (1) or bias (2) argument, positional or keyword."""
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name)


def _comes_after(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` is later than ``b`` in the graph."""
    n = b.next
    while n.op != "root":
        if n is a:
            return True
        n = n.next
    return False
