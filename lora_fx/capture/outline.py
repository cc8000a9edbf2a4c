"""Cut a traced block call out of an exported graph into a template graph of its own.

The call was traced between marker ops: ``mark_in(x, call, k)`` on its k-th tensor input and
``mark_out(y, call, k)`` on its k-th tensor output. Its region is everything the outputs depend on back to the
input markers that ran inside the block (export's ``nn_module_stack``), plus the parameters it reads and the
block's own side-effect nodes (shape asserts). Sizes the block takes from the outer graph (``sym_size`` of the
model input) are recomputed from the block's own inputs. The outer graph then calls the block
(``call_module``) where the region was::

    before:  h1 = mark_out(<block ops on mark_in(h0, 0, 0), ...>, 0, 0)
    after:   block = self.model.layers.0(h0, ...);  h1 = block[0]

Example::

    template_graph = outline(gm.graph, call=0, block="model.layers.0", names=["hidden_states", ...])
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..passes.common import ident

_LIB = torch.library.Library("lora_fx", "FRAGMENT")
_LIB.define("mark_in(Tensor x, int call, int index) -> Tensor")
_LIB.define("mark_out(Tensor x, int call, int index) -> Tensor")


def _never_run(x, call, index):
    raise RuntimeError("lora_fx's block markers exist only during capture; they are never executed.")


for _name in ("mark_in", "mark_out"):
    _LIB.impl(_name, _never_run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lora_fx::{_name}")(
        lambda x, call, index: torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device))

MARK_IN = torch.ops.lora_fx.mark_in.default
MARK_OUT = torch.ops.lora_fx.mark_out.default


class OutlineError(Exception):
    """The traced block does not form a region that can stand alone."""


def outline(graph: fx.Graph, call: int, block: str, names: list[str]) -> fx.Graph:
    """Move the region of block call ``call`` (of module ``block``) out of ``graph`` into a new graph, and
    call the block in its place. ``names``: the block's tensor inputs, for its placeholders."""
    ins = {n.args[2]: n for n in graph.nodes if n.target is MARK_IN and n.args[1] == call}
    outs = {n.args[2]: n for n in graph.nodes if n.target is MARK_OUT and n.args[1] == call}
    region, syms = _region(graph, block, set(ins.values()), [o.args[0] for o in outs.values()])
    template = _template(graph, block, ins, outs, region, syms, names)
    _replace(graph, block, ins, outs, region)
    return template


def _inside(node: fx.Node, block: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == block or path.startswith(block + ".") for path, _ in stack.values())


def _region(graph: fx.Graph, block: str, markers: set, results: list) -> tuple[set, dict]:
    region: set[fx.Node] = set()
    syms: dict[fx.Node, None] = {}  # sizes read from outside, recomputed inside
    stack = list(results)
    while stack:
        n = stack.pop()
        if n in region or n in markers or n in syms:
            continue
        if n.op == "get_attr" or _inside(n, block):
            region.add(n)
            stack.extend(n.all_input_nodes)
        elif isinstance(n.meta.get("val"), torch.SymInt):
            syms[n] = None
        else:
            raise OutlineError(f"block {block} reads {n.name!r} from outside without taking it as an input")
    changed = True
    while changed:  # the block's own nodes that only feed other block nodes or nothing (asserts)
        changed = False
        for n in graph.nodes:
            if n not in region and _inside(n, block) and n.op != "get_attr" and n.target not in (MARK_IN, MARK_OUT) \
                    and all(u in region for u in n.users) \
                    and all(i in region or i in markers or i in syms or i.op == "get_attr" for i in n.all_input_nodes):
                region.add(n)
                region.update(i for i in n.all_input_nodes if i.op == "get_attr")
                changed = True
    for n in region:
        if n.op != "get_attr" and any(u not in region and u.target is not MARK_OUT for u in n.users):
            raise OutlineError(f"a value of block {block} ({n.name!r}) is used outside it other than as an output")
    return region, syms


def _template(graph, block, ins, outs, region, syms, names) -> fx.Graph:
    t = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for k in sorted(ins):
        env[ins[k]] = t.placeholder(ident(names[k]) if k < len(names) else f"input_{k}")
        env[ins[k]].meta = dict(ins[k].meta)
    for s in syms:
        env[s] = _recompute(t, s, ins, env, block)
    prefix = block + "."
    for n in graph.nodes:
        if n in region:
            env[n] = t.node_copy(n, lambda x: env[x])
            if n.op in ("get_attr", "call_module") and n.target.startswith(prefix):
                env[n].target = n.target[len(prefix):]
    t.output(tuple(env[outs[k].args[0]] for k in sorted(outs)))
    return t


def _recompute(t: fx.Graph, s: fx.Node, ins: dict, env: dict, block: str) -> fx.Node:
    expr = str(s.meta["val"])
    for k in sorted(ins):
        val = ins[k].meta.get("val")
        for d, size in enumerate(getattr(val, "shape", ())):
            if str(size) == expr:
                node = t.call_function(torch.ops.aten.sym_size.int, (env[ins[k]], d))
                node.meta = dict(s.meta)
                return node
    raise OutlineError(f"block {block} uses the size {expr} ({s.name!r}), which is no size of its inputs")


def _replace(graph: fx.Graph, block: str, ins: dict, outs: dict, region: set) -> None:
    first_out = next(n for n in graph.nodes if n in outs.values())
    with graph.inserting_before(first_out):
        call = graph.call_module(block, tuple(ins[k].args[0] for k in sorted(ins)))
        call.meta = dict(first_out.meta)
        items = {k: graph.call_function(operator.getitem, (call, k)) for k in sorted(outs)}
    for k, o in outs.items():
        items[k].meta = dict(o.meta)
        o.replace_all_uses_with(items[k])
        graph.erase_node(o)
    for n in reversed(list(graph.nodes)):
        if n in region and not n.users:
            graph.erase_node(n)
    for m in ins.values():
        graph.erase_node(m)
