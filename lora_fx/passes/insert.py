"""insert_branches: each target's branches after its base node, in PEFT's op order: a variant's branch per active
adapter (``Variant.emit``), or one routed branch over the adapter bank's slots.

For a linear target with base output ``y = W x`` and plain LoRA the rewritten graph computes (other kinds: their
strategy's ``emit``; an embedding reads indices: no cast, no dropout)::

    x_l   = dropout(x.to(adapter_dtype))          # cast only when dtypes differ; dropout only when p > 0
    delta = F.linear(F.linear(x_l, A), B)         # B A x   (A: [r, in], B: [out, r])
    y'    = (y + delta * s).to(y.dtype)           # one `+ delta * s` per adapter, as PEFT does

and a routed target (``bank.routing``; the route and the stacked tensors are graph inputs)::

    y' = routed_<kind>(row_dropout(x, route), y, route, scales, A_bank, B_bank, (A_0, ...), (B_0, ...))

A lone plain branch is marked as a fusion candidate (``FUSABLE``) for ``fuse_siblings``.

Example::

    records = insert_branches(graph, ctx)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ..targets import arg, base_weight, compute_dtype
from .common import ident, new_node
from .pipeline import Action, GraphContext, Record, node_map
from .plan import RoutedBranch, UnitBranch

FUSABLE = "lora_fx_fusable"  # node meta: what fuse_siblings needs to compute this branch in a fused op


class BranchBuilder:
    """Creates one branch's nodes after the base node ``node`` (the variant decides which)."""

    def __init__(self, graph: fx.Graph, t: Any, node: fx.Node, branch: UnitBranch, inputs: Any,
                 base_dtype: torch.dtype, y: fx.Node) -> None:
        self.graph, self.target, self.node, self.branch, self.inputs = graph, t, node, branch, inputs
        self.unit, self.kind, self.geometry = branch.unit, t.strategy, t.geometry
        self.base_dtype, self.y, self.x = base_dtype, y, arg(node, *t.input_at)
        self.stem = ident(t.key if branch.adapter == "default" else f"{t.key}_{branch.adapter}")
        self.tag = {"adapter": branch.adapter, "key": t.key, "role": "branch"}
        self.created: list[fx.Node] = []
        self.tensors: dict[str, fx.Node] = {}
        self.dropout_node: fx.Node | None = None

    def new(self, op: str, target: Any, args: tuple, suffix: str, kwargs: dict | None = None) -> fx.Node:
        node = new_node(self.graph, op, target, args, f"{self.stem}_{suffix}", self.tag, kwargs)
        self.created.append(node)
        return node

    def tensor(self, attr: str) -> fx.Node:
        if attr not in self.tensors:
            self.tensors[attr] = self.inputs.unit_tensor(self.branch, self.target, attr)
        return self.tensors[attr]

    def dropout_path(self) -> str:
        return self.inputs.unit_dropout(self.branch, self.target)

    def cast(self) -> fx.Node:
        """The base node's input in the adapter's dtype (a cast only when they differ)."""
        if self.unit.lora_A.dtype == self.base_dtype:
            return self.x
        return self.new("call_method", "to", (self.x, self.unit.lora_A.dtype), "lora_in")

    def activation(self) -> fx.Node:
        """The branch's input: cast to the adapter's dtype and dropped out, where the kind reads activations."""
        x = self.cast() if self.kind.reads_activation else self.x
        if self.kind.reads_activation and self.unit.dropout_p > 0:
            x = self.dropout_node = self.new("call_module", self.dropout_path(), (x,), "lora_dropout")
        return x

    def weight(self) -> fx.Node:
        return self.inputs.weight(self.target) or self.new("get_attr", self.target.weight, (), "base_weight")

    def bias(self) -> fx.Node | None:
        ref = getattr(self.geometry, "bias", None)
        if ref is None:
            return None
        if ref.attr is not None:
            return self.new("get_attr", ref.attr, (), "base_bias")
        return arg(self.node, *ref.at)


def insert_branches(graph: fx.Graph, ctx: GraphContext) -> list[Record]:
    nodes, records = node_map(graph), []
    for t in ctx.targets:
        found = ctx.branches(t)
        if not found or t.key in ctx.consumed:
            continue
        node = nodes[t.node]
        if isinstance(found, RoutedBranch):
            _routed(graph, t, node, found, ctx.inputs)
            records += [Record("insert_branches", Action.ROUTED, t.key, a, dropout=u.dropout_p > 0)
                        for a, u, _ in found.slots if u is not None]
            continue
        _plain(graph, t, node, found, ctx.inputs, compute_dtype(t, base_weight(ctx.root, t.weight)))
        records += [Record("insert_branches", Action.BRANCH, t.key, b.adapter, dropout=b.unit.dropout_p > 0)
                    for b in found]
    return records


def _plain(graph: fx.Graph, t: Any, node: fx.Node, branches: tuple, inputs: Any, base_dtype: torch.dtype) -> None:
    """Add each branch to ``node``'s output; every later use of ``node`` reads the sum."""
    out, first = node, None
    with graph.inserting_before(node.next):  # new nodes go right after ``node``, in creation order
        for branch in branches:
            bb = BranchBuilder(graph, t, node, branch, inputs, base_dtype, out)
            out = branch.unit.variant.emit(bb)
            first = first or out
            if len(branches) == 1 and branch.unit.variant.fusable and branch.unit.lora_A.dtype == base_dtype:
                out.meta[FUSABLE] = bb
        if any(b.unit.lora_A.dtype != base_dtype and b.unit.variant.casts_output for b in branches):
            out = new_node(graph, "call_method", "to", (out, base_dtype), f"{ident(t.key)}_lora_out",
                           {"key": t.key, "role": "out"})
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not first)


def _routed(graph: fx.Graph, t: Any, node: fx.Node, routed: RoutedBranch, inputs: Any) -> None:
    """Replace the uses of ``node`` by its routed sum (the units' own parameters ride along, None for an adapter
    without this key, so that gradients reach them)."""
    x = arg(node, *t.input_at)
    stem, tag = ident(t.key), {"adapter": "bank", "key": t.key, "role": "branch"}

    def new(op, target, args, suffix, kwargs=None):
        return new_node(graph, op, target, args, f"{stem}_{suffix}", tag, kwargs)

    route = inputs.route()
    with graph.inserting_before(node.next):
        if t.strategy.reads_activation:
            x = new("call_module", inputs.bank_dropout(routed, t), (x, route), "lora_dropout")
        units = [UnitBranch(a, u, p) if u is not None else None for a, u, p in routed.slots]
        a_units = tuple(inputs.unit_tensor(b, t, "lora_A") if b else None for b in units)
        b_units = tuple(inputs.unit_tensor(b, t, "lora_B") if b else None for b in units)
        bank = (route, inputs.bank_tensor(routed, t, "scales"), inputs.bank_tensor(routed, t, "A"),
                inputs.bank_tensor(routed, t, "B"), a_units, b_units)
        out = t.strategy.emit_routed(graph, t.geometry, x, node, bank, new)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
