"""Optimisation passes: sibling fusion and dropout elision change node counts, never the numbers;
compiled training has no graph break in the LoRA parts."""

import pytest
import torch
import torch.nn.functional as F
from helpers import all_nodes, rel_err, run
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import Rule
from lora_fx.ops.group import lora_linear_group
from lora_fx.ops.linear_group import linear_lora_group


def _count(lm, target):
    return sum(n.op == "call_function" and n.target is target for n in all_nodes(lm))


def _loss_and_grads(lm, case, model=None):
    """A loss that depends on every output (fixed random weights), and the adapters' gradients."""
    for p in lm.trainable_parameters():
        p.grad = None
    out = output_tensor((model if model is not None else lm)(*case.inputs()))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))  # not invariant to LayerNorm
    loss = (out * weights).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in lm.trainable_parameters()]


def test_fusion_node_counts_llama():
    c = ZOO["llama"]
    plain = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), fuse=False, **c.lorafy_kwargs())
    fused = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), fuse=True, **c.lorafy_kwargs())
    # plain: two F.linear, one mul, one add per branch (14 branches); fused: per layer one q/k/v group, o_proj,
    # one gate/up group, down_proj = 4 ops x 2 layers, each owning its base linears (none left in the graph)
    base_linears = _count(plain, torch.ops.aten.linear.default)
    assert _count(plain, F.linear) == 28 and _count(plain, linear_lora_group) == 0 and base_linears >= 14
    assert _count(fused, linear_lora_group) == 8 and _count(fused, F.linear) == 0
    assert _count(fused, torch.ops.aten.linear.default) == base_linears - 14
    assert _count(fused, lora_linear_group) == 0
    assert "4 sibling groups" in str(fused.report()) and "8 own their base linears" in str(fused.report())
    assert "drop_dropout" in str(fused.report())
    assert len(list(all_nodes(fused))) < len(list(all_nodes(plain)))


@pytest.mark.parametrize("name", ["mlp", "functional", "llama", "qwen2", "bert", "embed"])
def test_fused_equals_plain_forward_and_backward(name):
    c = ZOO[name]
    plain = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), fuse=False, **c.lorafy_kwargs())
    fused = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), fuse=True, **c.lorafy_kwargs())
    fused.adapters.load_state_dict(plain.adapters.state_dict())
    assert rel_err(run(fused, c), run(plain, c)) < 1e-6  # no-grad path
    loss_p, grads_p = _loss_and_grads(plain, c)
    loss_f, grads_f = _loss_and_grads(fused, c)
    assert rel_err(loss_f, loss_p) < 1e-5
    assert [g is None for g in grads_p] == [g is None for g in grads_f]  # BERT's pooler gets no gradient
    gp = torch.cat([g.flatten() for g in grads_p if g is not None])
    gf = torch.cat([g.flatten() for g in grads_f if g is not None])
    assert rel_err(gf, gp) < 1e-5
    torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-6 * gp.abs().max().item())


def test_dropout_branches_are_fused_alone():
    c = ZOO["llama"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, dropout=0.1), **c.lorafy_kwargs())
    assert _count(lm, linear_lora_group) == 14  # one per branch: each has its own mask
    dropped = [n for n in all_nodes(lm) if n.target is linear_lora_group]
    assert all(n.args[1] is not None and n.args[1].op == "call_module" for n in dropped)  # the branch's own input
    assert "drop_dropout" not in str(lm.report())


def test_module_linears_keep_their_call():
    """nn.Linear module calls (symbolic trace) stay in the graph, hooks see their outputs; only the branches fuse."""
    c = ZOO["mlp"]
    model = c.build()
    seen = []
    model.fc1.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    lm = lora_fx.lorafy(model, Rule(c.targets, init=False), **c.lorafy_kwargs())
    assert _count(lm, lora_linear_group) > 0 and _count(lm, linear_lora_group) == 0
    lm.train()
    out = output_tensor(lm(*c.inputs()))
    out.sum().backward()
    x = c.inputs()[0]
    assert len(seen) == 1 and torch.allclose(seen[0], F.linear(x, model.fc1.weight, model.fc1.bias))


def test_unload_after_fusion_restores_base_graph():
    c = ZOO["llama"]
    model = c.build()
    base_out = run(model, c)
    lm = lora_fx.lorafy(model, Rule(c.targets, init=False), **c.lorafy_kwargs())
    n_captured = len(lora_fx.lorafy(c.build(), ["q_proj"], **c.lorafy_kwargs()).unload().graph.nodes)
    gm = lm.unload()
    assert len(gm.graph.nodes) == n_captured and torch.equal(run(gm, c), base_out)


@pytest.mark.parametrize("name,regional,graphs", [("mlp", True, 1), ("llama", False, 1), ("llama", True, 2)])
def test_compiled_training_has_no_graph_break(name, regional, graphs):
    """Whole-module compile: one graph. Regional (per block): one graph per block program, plus one for the first
    block, whose input (the frozen embedding's output) needs no gradient."""
    from torch._dynamo.utils import counters

    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), **c.lorafy_kwargs())
    loss_e, grads_e = _loss_and_grads(lm, c)
    torch._dynamo.reset()
    counters.clear()
    compiled = lora_fx.compile(lm, regional=regional)
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-3)
    loss_c, grads_c = _loss_and_grads(lm, c, compiled)
    assert rel_err(loss_c, loss_e) < 1e-5
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) < 1e-4
    opt.step()
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == graphs
