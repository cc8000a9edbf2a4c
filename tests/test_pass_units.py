"""Each graph pass on its own: a small graph in, the rewritten graph and typed records out."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx import Rule
from lora_fx.adapters import LoraUnit
from lora_fx.errors import PassError
from lora_fx.ops.linear_group import linear_lora_group
from lora_fx.passes import Action, GraphContext, Ref, RewritePlan, RoutedBranch, UnitBranch, run_pipeline
from lora_fx.passes.common import BlockInputs, StoreInputs, copy_graph
from lora_fx.passes.fuse import fuse_siblings
from lora_fx.passes.insert import insert_branches
from lora_fx.passes.saved import swap_saved
from lora_fx.passes.untie import untie_merged
from lora_fx.passes.wire import wire_block_calls
from lora_fx.targets import Target, find_targets


class Siblings(nn.Module):
    """q and k read the same x (functional linears on parameters); a head reads their sum."""

    def __init__(self):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(6, 4))
        self.wk = nn.Parameter(torch.randn(6, 4))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.linear(x, self.wq) + F.linear(x, self.wk))


def _setup(r=2, adapters=("a",)):
    torch.manual_seed(0)
    model = Siblings()
    gm = fx.symbolic_trace(model)
    targets = [t for t in find_targets(gm.graph, gm, model) if isinstance(t, Target) and not t.strategy.explicit]
    branches = {}
    for name in adapters:
        for t in targets:
            unit = LoraUnit(t.key, t.strategy, t.geometry, Rule(t.key, r=r, alpha=2 * r, init=False),
                            dtype=torch.float32, device=torch.device("cpu"))
            gm.add_module(f"{name}_{t.key}", unit)
            branches[t.key] = (*branches.get(t.key, ()), UnitBranch(name, unit, f"{name}_{t.key}"))
    return model, gm, targets, branches


def _run(gm, graph, x):
    with torch.no_grad():
        return fx.GraphModule(gm, graph)(x)


def _reference(model, branches, x):
    """The closed form: each target's output plus s·B A x for every branch on it."""
    with torch.no_grad():
        def lin(w, key, b=None):
            y = F.linear(x if key != "head" else h, w, b)
            return y + sum(br.unit.scaling * F.linear(F.linear(x if key != "head" else h, br.unit.lora_A),
                                                      br.unit.lora_B) for br in branches.get(key, ()))
        h = None
        h = lin(model.wq, "wq") + lin(model.wk, "wk")
        return lin(model.head.weight, "head", model.head.bias)


def test_insert_branches_adds_each_branch_and_records_it():
    model, gm, targets, branches = _setup(adapters=("a", "b"))
    g = copy_graph(gm.graph)
    plan = RewritePlan(branches, fuse=False)
    records = insert_branches(g, GraphContext(targets, plan, StoreInputs(g), gm))
    assert [(r.action, r.key, r.adapter) for r in records] == [
        (Action.BRANCH, k, a) for k in ("wq", "wk", "head") for a in ("a", "b")]
    assert sum(n.target is F.linear for n in g.nodes) == 2 + 2 * 6  # the two base linears, then A and B per branch
    x = torch.randn(5, 4)
    assert torch.allclose(_run(gm, g, x), _reference(model, branches, x), atol=1e-6)


def test_fuse_siblings_turns_marked_branches_into_one_op():
    model, gm, targets, branches = _setup()
    g = copy_graph(gm.graph)
    ctx = GraphContext(targets, RewritePlan(branches, fuse=True), StoreInputs(g), gm)
    insert_branches(g, ctx)
    records = fuse_siblings(g, ctx)
    fused = [r for r in records if r.action is Action.FUSED]
    assert {r.key for r in fused} == {"wq", "wk", "head"} and len({r.group for r in fused}) == 2
    assert all(r.owns_base for r in fused if r.key != "head")  # functional linears: the op owns them
    assert sum(n.target is linear_lora_group for n in g.nodes) == 1
    assert not any(n.target is F.linear for n in g.nodes)
    g.lint()
    x = torch.randn(5, 4)
    assert torch.allclose(_run(gm, g, x), _reference(model, branches, x), atol=1e-6)


def test_fuse_siblings_without_fuse_leaves_the_plain_branches():
    _, gm, targets, branches = _setup()
    g = copy_graph(gm.graph)
    ctx = GraphContext(targets, RewritePlan(branches, fuse=False), StoreInputs(g), gm)
    insert_branches(g, ctx)
    before = [n.format_node() for n in g.nodes]
    assert fuse_siblings(g, ctx) == [] and [n.format_node() for n in g.nodes] == before


def test_untie_merged_points_the_target_at_its_copy():
    model, gm, targets, _ = _setup()
    gm.register_parameter("wq_merged", nn.Parameter(model.wq.detach() * 2))
    g = copy_graph(gm.graph)
    untied = {"wq": "wq_merged"}
    ctx = GraphContext(targets, RewritePlan({}, untied=untied), StoreInputs(g, untied=untied), gm)
    records = untie_merged(g, ctx)
    assert [(r.action, r.key) for r in records] == [(Action.UNTIED, "wq")]
    reads = {n.target for n in g.nodes if n.op == "get_attr"}
    assert "wq_merged" in reads and "wq" not in reads and "wk" in reads
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = model.head(F.linear(x, model.wq * 2) + F.linear(x, model.wk))
    assert torch.allclose(_run(gm, g, x), want)


def test_swap_saved_retargets_module_uses():
    model, gm, targets, _ = _setup()
    gm.add_module("copy_of_head", nn.Linear(6, 3))
    g = copy_graph(gm.graph)
    records = swap_saved(g, GraphContext(targets, RewritePlan({}, saved={"head": "copy_of_head"}), StoreInputs(g), gm))
    assert [(r.action, r.key) for r in records] == [(Action.SAVED, "head")]
    assert [n.target for n in g.nodes if n.op == "call_module"] == ["copy_of_head"]


def test_routed_branch_reads_the_route_input():
    _, gm, targets, branches = _setup()
    bank = nn.Module()
    g = copy_graph(gm.graph)
    with g.inserting_before(next(iter(g.nodes)).next):
        route = g.placeholder("lora_route")
    head = next(t for t in targets if t.key == "head")
    unit = branches["head"][0].unit
    routed = RoutedBranch((("a", unit, "a_head"),), "bank", "head", nn.Identity())
    gm.add_module("bank", bank)
    records = insert_branches(g, GraphContext([head], RewritePlan({"head": routed}), StoreInputs(g, route), gm))
    assert [(r.action, r.key, r.adapter) for r in records] == [(Action.ROUTED, "head", "a")]
    routed_node = next(n for n in g.nodes if n.name.endswith("lora_routed"))
    assert route in routed_node.args and {f"bank.head__{w}" for w in ("A", "B", "scales")} <= {
        n.target for n in g.nodes if n.op == "get_attr"}


def test_block_inputs_record_refs_and_wire_block_calls_resolves_them():
    _, gm, targets, branches = _setup()
    g = copy_graph(gm.graph)
    inputs = BlockInputs(g, set())
    ctx = GraphContext(targets, RewritePlan({f"blk.{k}": v for k, v in branches.items()}), inputs, gm,
                       prefix="blk.")
    insert_branches(g, ctx)
    assert inputs.order[:2] == [Ref("unit", "wq", "lora_A", "a"), Ref("unit", "wq", "lora_B", "a")]
    outer = fx.Graph()
    x = outer.placeholder("x")
    call = outer.call_module("blk", (x,))
    outer.output(call)
    records = wire_block_calls(outer, GraphContext([], ctx.plan, StoreInputs(outer), gm,
                                                   block_inputs={"blk": inputs.order}))
    assert [(r.action, r.key) for r in records] == [(Action.WIRED, "blk")]
    assert [a.target for a in call.args[1:]] == ["a_wq.lora_A", "a_wq.lora_B", "a_wk.lora_A", "a_wk.lora_B",
                                                 "a_head.lora_A", "a_head.lora_B"]


def test_a_failing_pass_is_named_and_debug_lints_after_each():
    _, gm, targets, branches = _setup()
    g = copy_graph(gm.graph)

    def broken(graph, ctx):
        raise IndexError("boom")
    with pytest.raises(PassError, match="graph pass broken failed on the outer graph .IndexError: boom"):
        run_pipeline(g, (insert_branches, broken), GraphContext(targets, RewritePlan(branches), StoreInputs(g), gm),
                     "outer graph")

    def dangling(graph, ctx):  # leaves a node whose input is not defined before it
        first = next(iter(graph.nodes))
        with graph.inserting_before(first):
            graph.call_function(operator.neg, (list(graph.nodes)[-2],))
        return []
    ctx = GraphContext(targets, RewritePlan({}), StoreInputs(g), gm, debug=True)
    with pytest.raises(PassError, match="dangling"):
        run_pipeline(copy_graph(gm.graph), (dangling,), ctx, "outer graph")
