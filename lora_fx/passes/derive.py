"""Derive the runnable graphs from the pristine captured ones and the adapter state: the only way graphs change.

``derive`` copies the pristine outer graph and, once per rewrite group, a block template; runs the pure passes
on the copies (untie merged shared weights, insert plain branches, fuse siblings, swap saved modules, wire the
block calls' adapter inputs) and installs them. Blocks whose adapters are alike (same adapters, kinds of branch
and scalings on the same template targets) share one rewritten program, so the work is one template rewrite
per group plus time linear in the number of targets. Nothing is ever undone: the next rebuild starts again
from the pristine graphs.

Example::

    records = derive(cap, Rewrite(store, "lora", live=["default"], fuse=True, saved={}, untied={}))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import fx, nn

from ..blocks import Program
from ..targets import Target, base_weight, compute_dtype
from .branches import insert_plain
from .common import BANK, BlockInputs, StoreInputs, copy_graph
from .fuse import fusable, fuse_linear
from .routed import insert_routed
from .saved import swap_saved

if TYPE_CHECKING:
    from ..capture import Captured


@dataclass
class Rewrite:
    """The state graphs are derived from, besides the captured graphs."""

    store: nn.Module  # the AdapterStore
    store_name: str  # its attribute name on the graph module
    live: list[str]  # adapters whose branches the graphs compute, in order
    fuse: bool = True
    saved: dict[str, str] = field(default_factory=dict)  # module path -> path of the copy read instead
    untied: dict[str, str] = field(default_factory=dict)  # key -> path of its merged weight's own copy


def derive(cap: Captured, rw: Rewrite) -> list[dict]:
    """Rebuild every graph from the pristine ones; returns one record per (key, adapter) branch. With an adapter
    bank every adapter in it is routed (``live`` is ignored): one ``(adapter, unit or None)`` per slot."""
    bank = rw.store.bank
    slots = bank.slots if bank is not None else rw.live
    units = {a: rw.store.units(a) for a in slots}

    def branches_for(key: str) -> list:
        if bank is not None:
            return [(a, units[a].get(key)) for a in slots] if key in bank.stems else []
        return [(a, units[a][key]) for a in rw.live if key in units[a]]

    records: list[dict] = []
    assignments = _derive_blocks(cap, rw, branches_for, records)
    g = copy_graph(cap.graph)
    inputs = StoreInputs(g, rw.store_name, rw.store, rw.untied)
    outer = [t for t in cap.targets if isinstance(t, Target) and not t.block]
    records += rewrite_graph(g, outer, lambda t: branches_for(t.key), inputs, cap.graph_module, rw.fuse,
                             bank is not None)
    swap_saved(g, rw.saved)
    _wire_block_calls(g, rw, {path: inputs.order for path, (_, inputs, _) in assignments.items()}, cap.key_prefix)
    g.lint()
    for path, (program, _, dropouts) in assignments.items():  # nothing is installed until everything is built
        block = cap.blocks[path]
        block.set_program(program, cap.program_key)
        if cap.program_key and hasattr(block, "lora_dropout"):
            block.lora_dropout.update(dropouts)
        else:
            block.lora_dropout = dropouts
    cap.graph_module.graph = g  # recompiles
    return records


def rewrite_graph(graph: fx.Graph, targets: list[Target], branches_for: Callable, inputs, root: nn.Module,
                  fuse: bool, routed: bool = False) -> list[dict]:
    """Untie, insert and fuse the branches of ``targets`` in ``graph`` (a fresh copy); ``root`` resolves weights.
    ``routed``: each target's branches are the bank's slots, inserted as one routed node."""
    nodes = {n.name: n for n in graph.nodes}
    fused, records = [], []
    for t in targets:
        node = nodes[t.node]
        _untie(graph, t, node, inputs)
        branches = branches_for(t)
        if not branches:
            continue
        if routed:
            insert_routed(graph, t, node, branches, inputs)
            records += [{"key": t.key, "adapter": a, "form": "routed", "group": None, "dropout": u.dropout_p > 0}
                        for a, u in branches if u is not None]
            continue
        base_dtype = compute_dtype(t, base_weight(root, t.weight))
        if fuse and len(branches) == 1 and fusable(t, branches[0][1], base_dtype):
            fused.append((t, node, *branches[0]))
            continue
        insert_plain(graph, t, node, branches, inputs, base_dtype)
        records += [{"key": t.key, "adapter": a, "form": "plain", "group": None, "dropout": u.dropout_p > 0}
                    for a, u in branches]
    return records + fuse_linear(graph, fused, inputs)


def _untie(graph: fx.Graph, t: Target, node: fx.Node, inputs) -> None:
    """A merged key whose weight has other uses reads its own merged copy (call_module forms swap the module's
    weight instead: see ``merge``)."""
    if node.op == "call_module":
        return
    with graph.inserting_before(node):
        copy_node = inputs.weight(t)
    if copy_node is None:
        return
    old = next(a for a in (*node.args, *node.kwargs.values())
               if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == t.weight)
    node.replace_input_with(old, copy_node)
    if not old.users:
        graph.erase_node(old)


def _derive_blocks(cap: Captured, rw: Rewrite, branches_for: Callable, records: list[dict]) -> dict[str, tuple]:
    """Every block's (program, its inputs, its dropout modules), one program per rewrite group."""
    programs: dict[tuple, tuple[Program, BlockInputs, list[dict]]] = {}
    assignments: dict[str, tuple] = {}
    for path, block in cap.blocks.items():
        t = cap.template_of(path)
        targets = [x for x in t.targets if isinstance(x, Target)]
        full = {x.key: f"{cap.key_prefix}{path}.{x.key}" for x in targets}
        signature = (t.id, tuple(
            (tuple(_branch_signature(a, u, block, x) for a, u in branches_for(full[x.key])), full[x.key] in rw.untied)
            for x in targets))
        if signature not in programs:
            g = copy_graph(t.graph)
            inputs = BlockInputs(g, {x.key for x in targets if full[x.key] in rw.untied})
            recs = rewrite_graph(g, targets, lambda x, full=full: branches_for(full[x.key]), inputs, block, rw.fuse,
                                 rw.store.bank is not None)
            g.lint()
            programs[signature] = (Program(g, f"block {t.id}"), inputs, recs)
        program, inputs, recs = programs[signature]
        dropouts = nn.ModuleDict({name: _dropout(rw.store, a, f"{cap.key_prefix}{path}.{rel}")
                                  for a, rel, name in inputs.dropouts})
        assignments[path] = (program, inputs, dropouts)
        records += [{**r, "key": f"{cap.key_prefix}{path}.{r['key']}", "group": r["group"] and f"{path}/{r['group']}"}
                    for r in recs]
    return assignments


def _dropout(store: nn.Module, adapter: str, key: str) -> nn.Module:
    """The dropout module a block's program calls: the unit's, or the bank's per-row one for a routed key."""
    if adapter == BANK:
        return store.bank.get_submodule(store.bank.dropout_path(key))
    return store.unit(adapter, key).dropout


def _branch_signature(adapter: str, unit, block: nn.Module, t: Target) -> tuple:
    """What a branch's nodes depend on: two blocks whose branches agree on all of this share one program (a
    routed branch reads its scalings and dropout from the bank: only the slots present matter)."""
    if unit is None or unit.routed:
        return (adapter, unit is not None)
    return (adapter, unit.use_dora, unit.lora_bias, unit.dropout_p > 0, unit.lora_A.dtype, float(unit.scaling),
            compute_dtype(t, base_weight(block, t.weight)))


def _wire_block_calls(graph: fx.Graph, rw: Rewrite, inputs_of: dict[str, list], key_prefix: str) -> None:
    """Pass each block the adapter tensors its program reads (``get_attr`` on the store, or merged copies)."""
    for node in list(graph.nodes):
        order = inputs_of.get(node.target) if node.op == "call_module" else None
        if not order:
            continue
        extra = []
        with graph.inserting_before(node):
            for adapter, rel, attr in order:
                key = f"{key_prefix}{node.target}.{rel}"
                if adapter is None:
                    path = rw.untied[key]
                elif adapter == BANK:
                    path = f"{rw.store_name}.{BANK}.{rw.store.bank.attr(key, attr)}"
                else:
                    path = f"{rw.store_name}.{rw.store.unit_path(adapter, key)}.{attr}"
                extra.append(graph.get_attr(path))
        node.args = (*node.args, *extra)
