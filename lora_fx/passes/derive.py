"""Derive the runnable graphs from the pristine captured ones and a rewrite plan: the only way graphs change.

``build`` copies the pristine outer graph and, once per rewrite group, a block template, runs the pipelines on the
copies and returns them without touching anything live (``Derived``); ``install`` puts them in place through the
caller's transaction. Blocks whose branches are alike (same adapters, variants, dropout, dtypes and scalings on
the same template targets) share one rewritten program, so the work is one template rewrite per group plus time
linear in the number of targets. Nothing is ever undone: the next rebuild starts again from the pristine graphs.

The pipelines::

    block template:  untie_merged -> insert_branches -> fuse_siblings
    outer graph:     untie_merged -> fuse_loss -> insert_branches -> fuse_siblings -> swap_saved -> swap_tokens
                     -> wire_block_calls

A routed plan gives the outer graph one more input, ``lora_route`` (the slot of each row; default: the bank's
default route), which every routed branch and block reads.

Example::

    derived = build(cap, plan)          # pure
    install(derived, tx)                # live
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch.utils._pytree as pytree
from torch import fx, nn

from ..bank.routing import pick_route
from ..capture.blocks import Program
from ..targets import Target, base_weight, compute_dtype
from .common import TAG, BlockInputs, StoreInputs, copy_graph
from .fuse import fuse_siblings
from .fused_loss import fuse_loss
from .insert import insert_branches
from .pipeline import GraphContext, Record, run_pipeline
from .plan import Ref, RewritePlan, RoutedBranch
from .saved import swap_saved
from .tokens import swap_tokens
from .untie import untie_merged
from .wire import wire_block_calls

if TYPE_CHECKING:
    from ..capture import Captured

BLOCK_PIPELINE = (untie_merged, insert_branches, fuse_siblings)
OUTER_PIPELINE = (untie_merged, fuse_loss, insert_branches, fuse_siblings, swap_saved, swap_tokens,
                  wire_block_calls)
ROUTE_INPUT = "lora_route"


@dataclass
class Derived:
    """A capture's graphs for one plan, built aside: the outer graph and each block's (program, dropouts)."""

    cap: Captured
    graph: fx.Graph
    blocks: dict[str, tuple[Program, nn.ModuleDict]]
    records: list[Record]


def build(cap: Captured, plan: RewritePlan, *, debug: bool = False) -> Derived:
    """Every graph of ``cap`` rewritten for ``plan``; nothing live changes."""
    programs: dict[tuple, tuple[Program, BlockInputs, list[Record]]] = {}
    blocks: dict[str, tuple[Program, nn.ModuleDict]] = {}
    orders: dict[str, list] = {}
    records: list[Record] = []
    for path, block in cap.blocks.items():
        t = cap.template_of(path)
        targets = [x for x in t.targets if isinstance(x, Target)]
        prefix = f"{cap.key_prefix}{path}."
        signature = (t.id, tuple(_signature(plan, prefix + x.key, block, x) for x in targets))
        if signature not in programs:
            g = copy_graph(t.graph)
            inputs = BlockInputs(g, {x.key for x in targets if prefix + x.key in plan.untied})
            ctx = GraphContext(targets, plan, inputs, block, prefix=prefix, debug=debug)
            recs = run_pipeline(g, BLOCK_PIPELINE, ctx, f"block program of {t.id}")
            g.lint()
            programs[signature] = (Program(g, f"block {t.id}"), inputs, recs)
        program, inputs, recs = programs[signature]
        dropouts = nn.ModuleDict({name: _dropout(plan, ref, prefix + ref.key) for ref, name in inputs.dropouts})
        blocks[path], orders[path] = (program, dropouts), inputs.order
        records += [replace(r, key=prefix + r.key, group=r.group and f"{path}/{r.group}") for r in recs]
    g = copy_graph(cap.graph)
    route = _route_input(g, plan) if plan.routed else None
    inputs = StoreInputs(g, route, dict(plan.untied))
    outer = [t for t in cap.targets if isinstance(t, Target) and not t.block and not t.inert]
    ctx = GraphContext(outer, plan, inputs, cap.graph_module, block_inputs=orders, key_prefix=cap.key_prefix,
                       debug=debug)
    records += run_pipeline(g, OUTER_PIPELINE, ctx, "outer graph")
    g.lint()
    return Derived(cap, g, blocks, records)


def install(derived: Derived, tx: Any, attach: dict[str, nn.Module] | None = None) -> None:
    """Put ``derived``'s graphs in place through ``tx`` (every change undone if the transaction rolls back);
    ``attach``: modules the graphs read that the capture's graph module must hold (the store, merged copies)."""
    cap = derived.cap
    gm = cap.graph_module
    for name, module in (attach or {}).items():
        if getattr(gm, name, None) is not module:
            tx.add_module(gm, name, module)
    key = cap.program_key
    for path, (program, dropouts) in derived.blocks.items():
        block = cap.blocks[path]
        old = block.programs.get(key)
        tx.call(lambda b=block, p=program: b.set_program(p, key), lambda b=block, p=old: b.set_program(p, key))
        if key and isinstance(getattr(block, "lora_dropout", None), nn.ModuleDict):
            dropouts = nn.ModuleDict({**block.lora_dropout, **dropouts})  # other captures' dropouts stay
        tx.add_module(block, "lora_dropout", dropouts)
    tx.setattr(gm, "graph", derived.graph)  # recompiles


def _route_input(g: fx.Graph, plan: RewritePlan) -> fx.Node:
    """Add the ``lora_route`` input (after the others; a pytree-flattened signature learns the new keyword) and the
    node that falls back to the bank's default route when a call passes none."""
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    codegen = g._codegen
    info = getattr(codegen, "pytree_info", None)
    with g.inserting_after(placeholders[-1]) if placeholders else g.inserting_before(next(iter(g.nodes))):
        ph = g.placeholder(ROUTE_INPUT) if info is not None else g.placeholder(ROUTE_INPUT, default_value=None)
    if info is not None:
        args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
        _, spec = pytree.tree_flatten((args, {**kwargs, ROUTE_INPUT: 0}))
        g.set_codegen(type(codegen)(type(info)([*info.orig_args, ROUTE_INPUT], spec, info.out_spec)))
    with g.inserting_before(ph.next):
        default = g.get_attr(plan.route_default)
        route = g.call_function(pick_route, (ph, default))
    default.meta[TAG] = route.meta[TAG] = {"role": "route"}
    return route


def _signature(plan: RewritePlan, key: str, block: nn.Module, t: Target) -> tuple:
    found = plan.for_key(key)
    base_dtype = compute_dtype(t, base_weight(block, t.weight))
    if isinstance(found, RoutedBranch):
        return (found.signature(base_dtype),), key in plan.untied
    branches = tuple(b.signature(base_dtype) for b in found)
    return branches, key in plan.untied


def _dropout(plan: RewritePlan, ref: Ref, key: str) -> nn.Module:
    """The dropout module a block's program calls: the unit's, or the bank's per-row one for a routed key."""
    found = plan.for_key(key)
    if ref.what == "bank":
        return found.dropout
    return next(b for b in found if b.adapter == ref.adapter).unit.dropout
