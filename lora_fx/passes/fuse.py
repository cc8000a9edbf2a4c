"""Sibling fusion: linear LoRA branches that read the same input run as one autograd op.

For siblings ``q, k, v = W_q x, W_k x, W_v x`` the pass emits one node::

    q_lora, k_lora, v_lora = lora_linear_group(x, (q, k, v), (A_q, A_k, A_v), (B_q, B_k, B_v), (s, s, s))

which computes ``h = x [A_q; A_k; A_v]ᵀ`` in one GEMM and adds ``s · h_i B_iᵀ`` into each base output with
one in-place ``addmm_`` (scale folded in, no separate multiply/add kernels); its backward computes ``dA`` and
``dx`` for the whole group in one GEMM each (see ``ops.lora_linear_group``). A lone linear target becomes a
group of one. Branches with dropout get their own group (each branch has its own dropout mask).

Eligible: linear targets in ``nn.Linear`` / ``F.linear`` / ``aten.linear`` form whose adapter has the base
weight's dtype. Sibling base nodes are moved next to the first one so the group can follow them all.

Example::

    group = sibling_group(gm, t, candidates)   # t plus the siblings that can join it
    emit_group(gm, store, group, "default")
"""

from __future__ import annotations

import operator

from torch import fx

from ..ops import lora_linear_group
from ..store import AdapterStore, LoraUnit
from ..targets import Target
from .common import new_node

FUSABLE_OPS = ("Linear", "F.linear", "aten.linear")


def fusable(gm: fx.GraphModule, t: Target, unit: LoraUnit) -> bool:
    return (t.kind == "linear" and t.op in FUSABLE_OPS and not unit.use_dora and not unit.lora_bias
            and unit.lora_A.dtype == gm.get_parameter(t.weight_path).dtype)


def sibling_group(gm: fx.GraphModule, first: Target, candidates: list[Target], dropout: bool) -> list[Target]:
    """``first`` plus the candidates that read the same input and can be moved right after it."""
    if dropout:
        return [first]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = order[first.node]
    group = [first]
    for t in candidates:
        if t.input is not first.input or t.node is first.node:
            continue
        inputs = t.node.all_input_nodes
        if all(order[i] < start or i.op == "get_attr" for i in inputs):
            group.append(t)
    return group


def emit_group(gm: fx.GraphModule, store: AdapterStore, group: list[Target], adapter: str,
               store_name: str) -> fx.Node:
    """Rewrite ``group`` (siblings, in graph order) into one ``lora_linear_group`` node; returns it."""
    g = gm.graph
    first = group[0].node
    cursor = first
    for t in group[1:]:  # bring the siblings (and any late weight get_attr) next to the first one
        for i in t.node.all_input_nodes:
            if i.op == "get_attr":
                first.prepend(i)
        cursor.append(t.node)
        cursor = t.node
    units = [store.unit(adapter, t.key) for t in group]
    paths = [f"{store_name}.{store.unit_path(adapter, t.key)}" for t in group]
    names = [p.rsplit(".", 1)[-1] for p in paths]
    base_tag = {"adapter": adapter, "key": group[0].key, "base": first.name, "role": "branch"}
    with g.inserting_before(cursor.next):
        x = group[0].input
        if units[0].dropout_p > 0:
            x = new_node(g, "call_module", f"{paths[0]}.dropout", (x,), f"{names[0]}_lora_dropout", base_tag)
        a_nodes = tuple(new_node(g, "get_attr", f"{p}.lora_A", (), f"{n}_lora_A", base_tag)
                        for p, n in zip(paths, names))
        b_nodes = tuple(new_node(g, "get_attr", f"{p}.lora_B", (), f"{n}_lora_B", base_tag)
                        for p, n in zip(paths, names))
        ys = tuple(t.node for t in group)
        scalings = tuple(float(u.scaling) for u in units)
        grp = new_node(g, "call_function", lora_linear_group, (x, ys, a_nodes, b_nodes, scalings),
                       f"{names[0]}_lora_group" if len(group) > 1 else f"{names[0]}_lora_fused", base_tag)
        outs = []
        for i, (t, name) in enumerate(zip(group, names)):
            tag = {"adapter": adapter, "key": t.key, "base": t.node.name, "role": "out"}
            outs.append(new_node(g, "call_function", operator.getitem, (grp, i), f"{name}_lora", tag))
    for t, out in zip(group, outs):
        t.node.replace_all_uses_with(out, delete_user_cb=lambda user, grp=grp: user is not grp)
    return grp
