"""fuse_siblings: linear LoRA branches that read the same input run as one autograd op.

For siblings ``q, k, v = F.linear(x, W_q), ...`` (functional or aten linear nodes) whose plain branches
``insert_branches`` marked, the pass replaces the base nodes and their branches with one node that owns the base
GEMMs too::

    q_lora, k_lora, v_lora = linear_lora_group(x, None, (W_q, W_k, W_v), (b_q, b_k, b_v), (A_q, A_k, A_v),
                                               (B_q, B_k, B_v), (s, s, s))

(``ops.linear_group``: ``h = x [A_q; A_k; A_v]ᵀ`` in one GEMM, each ``s · h_i B_iᵀ`` added into its fresh base
output, and in backward every ``dx`` term accumulated into one buffer). Siblings that are ``nn.Linear`` module
calls keep their module call (a hook may see its output) and get the branches only::

    q_lora, k_lora, v_lora = lora_linear_group(x, (q, k, v), (A_q, A_k, A_v), (B_q, B_k, B_v), (s, s, s))

Candidates are bucketed in one pass by (input node, adapter); a lone linear target is a group of one, and a
branch with dropout is alone (each branch has its own dropout mask; its branch reads ``dropout(x)``).

Eligible: linear targets in ``nn.Linear`` / ``F.linear`` / ``aten.linear`` form whose lone branch's variant is
fusable and whose adapter has the base weight's dtype (``insert_branches`` marks them). A sibling joins its
group's first member only if it can be moved right after it (its inputs are defined before the first member).

Example::

    records = fuse_siblings(graph, ctx)
"""

from __future__ import annotations

import operator
from collections import defaultdict

from torch import fx

from ..kinds import LINEAR
from ..ops.group import lora_linear_group
from ..ops.linear_group import linear_lora_group
from ..targets import arg
from .common import ident, new_node
from .insert import FUSABLE
from .pipeline import Action, GraphContext, Record

FUSABLE_OPS = ("Linear", "F.linear", "aten.linear")


def fuse_siblings(graph: fx.Graph, ctx: GraphContext) -> list[Record]:
    """Emit the marked branches, in graph order, as fused groups; one record each."""
    candidates = []
    for node in graph.nodes:
        bb = node.meta.pop(FUSABLE, None)
        if bb is not None and ctx.plan.fuse and bb.target.strategy is LINEAR and bb.target.op in FUSABLE_OPS:
            candidates.append((node, bb))
    buckets: dict[tuple, list] = defaultdict(list)
    for c in candidates:
        bb = c[1]
        key = (id(c),) if bb.dropout_node is not None else (bb.x, bb.branch.adapter)
        buckets[key].append(c)
    records = []
    for bucket in buckets.values():
        while bucket:
            group = _movable(bucket, {n: i for i, n in enumerate(graph.nodes)} if len(bucket) > 1 else {})
            bucket = [c for c in bucket if c not in group]
            grp = _emit(graph, group)
            owns = grp.target is linear_lora_group
            records += [Record("fuse_siblings", Action.FUSED, bb.target.key, bb.branch.adapter, grp.name,
                               bb.dropout_node is not None, owns) for _, bb in group]
    return records


def _movable(bucket: list, order: dict) -> list:
    """The bucket's first member plus the siblings that can be moved right after it."""
    group = [bucket[0]]
    if len(bucket) == 1:
        return group
    start = order[bucket[0][1].node]
    for c in bucket[1:]:
        if all(order.get(i, -1) < start or i.op == "get_attr" for i in c[1].node.all_input_nodes):
            group.append(c)
    return group


def _emit(graph: fx.Graph, group: list) -> fx.Node:
    first = group[0][1].node
    cursor = first
    for _, bb in group[1:]:  # bring the siblings (and any later weight get_attr) next to the first one
        for i in bb.node.all_input_nodes:
            if i.op == "get_attr" and _comes_after(i, first):
                first.prepend(i)
        cursor.append(bb.node)
        cursor = bb.node
    bb0 = group[0][1]
    tag = {"adapter": bb0.branch.adapter, "key": bb0.target.key, "role": "branch"}
    a_nodes = tuple(bb.tensors["lora_A"] for _, bb in group)
    b_nodes = tuple(bb.tensors["lora_B"] for _, bb in group)
    scalings = tuple(float(bb.unit.scaling) for _, bb in group)
    ys = tuple(bb.node for _, bb in group)
    base_x = arg(first, *bb0.target.input_at)  # now: an earlier group may have replaced the node it read
    x = bb0.dropout_node if bb0.dropout_node is not None else base_x
    name = f"{bb0.stem}_lora_group" if len(group) > 1 else f"{bb0.stem}_lora_fused"
    with graph.inserting_before(cursor.next):
        if all(node.op == "call_function" for node in ys):  # the base GEMMs join the op
            ws = tuple(_operand(n, 1, "weight") for n in ys)
            bs = tuple(_operand(n, 2, "bias") for n in ys)
            grp = new_node(graph, "call_function", linear_lora_group,
                           (base_x, None if x is base_x else x, ws, bs, a_nodes, b_nodes, scalings), name, tag)
        else:  # a module call stays: a hook may keep its output, so the deltas are not added into it in place
            grp = new_node(graph, "call_function", lora_linear_group, (x, ys, a_nodes, b_nodes, scalings, False),
                           name, tag)
        outs = []
        for i, (_, bb) in enumerate(group):
            out_tag = {"adapter": bb.branch.adapter, "key": bb.target.key, "role": "out"}
            outs.append(new_node(graph, "call_function", operator.getitem, (grp, i), f"{ident(bb.stem)}_lora",
                                 out_tag))
    for inp in (*a_nodes, *b_nodes, x):  # inputs created after a moved sibling come before the op
        if inp.op != "placeholder" and _comes_after(inp, grp):
            grp.prepend(inp)
    keep = {*a_nodes, *b_nodes, x}
    for (last, bb), out in zip(group, outs):
        last.replace_all_uses_with(out)
        for node in reversed(bb.created):
            if node not in keep:
                graph.erase_node(node)
        if grp.target is linear_lora_group:
            graph.erase_node(bb.node)
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
