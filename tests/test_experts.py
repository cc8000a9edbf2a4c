"""LoRA on mixture-of-experts weights (PEFT's ``target_parameters``): every MoE family of transformers 5 in each
experts implementation that runs on CPU, against PEFT 0.21 as the oracle: outputs, gradients, checkpoints both
ways, merge; the loop form under symbolic_trace; 2-D parameters; refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err
from moe_zoo import ATTENTION, LoopModel, MlpUsingParameters, hf_moe

import lora_fx
from lora_fx import Rule
from lora_fx.errors import AdapterError, RuleError

peft = pytest.importorskip("peft")

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config(family: str, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=[ATTENTION.get(family, "q_proj")],
                           target_parameters=EXPERT_PARAMS, init_lora_weights=False, **kw)


def _pair(family: str, implementation: str, tmp_path, ids):
    """PEFT's model with random adapters on attention and experts, saved; lora_fx's from that file."""
    base = hf_moe(family)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        pm = peft.get_peft_model(copy.deepcopy(base), _config(family))
    pm.base_model.model.set_experts_implementation(implementation)
    pm.save_pretrained(tmp_path / "peft")
    mine = copy.deepcopy(base)
    mine.set_experts_implementation(implementation)
    return pm, lora_fx.from_peft(mine, tmp_path / "peft", example_inputs=(ids,))


def _ids(b=2, t=7):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return torch.randint(3, 96, (b, t))


CASES = [("qwen3_moe", "grouped_mm"), ("qwen3_moe", "batched_mm"), ("qwen3_moe", "eager"),
         ("mixtral", "grouped_mm"), ("olmoe", "grouped_mm"), ("gpt_oss", "grouped_mm"), ("gpt_oss", "batched_mm"),
         ("qwen2_moe", "grouped_mm"), ("deepseek_v3", "grouped_mm")]


@pytest.mark.parametrize("family,implementation", CASES)
def test_expert_lora_equals_peft_outputs_and_gradients(family, implementation, tmp_path):
    ids = _ids()
    pm, lm = _pair(family, implementation, tmp_path, ids)
    experts = [t for t in lm.targets if t.kind == "param" and t.geometry.experts > 1]
    assert {t.key.rpartition(".")[2] for t in experts} == {"gate_up_proj", "down_proj"}
    assert all(f"E={t.geometry.experts}" in t.op for t in experts)
    labels = ids.clone()
    ref = pm(ids, labels=labels)
    out = lm(ids, labels=labels)
    assert rel_err(out.logits, ref.logits) < 1e-5
    ref.loss.backward()
    out.loss.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine = {}
    for unit in lm.adapters.units("default").values():
        for name in unit.variant.peft_tensors(unit):
            mine[f"base_model.model.{unit.peft_key}.{name}"] = getattr(unit, name.split(".")[0]).grad
    assert set(mine) == set(theirs)
    for name, g in theirs.items():
        assert rel_err(mine[name], g) < 1e-4, name


def test_checkpoints_load_both_ways_and_merge_is_exact(tmp_path):
    ids = _ids()
    pm, lm = _pair("qwen3_moe", "grouped_mm", tmp_path, ids)
    with torch.no_grad():
        want = lm(ids).logits
    lm.save_pretrained(tmp_path / "mine")
    saved = (tmp_path / "mine" / "adapter_model.safetensors").read_bytes()
    assert b"experts.base_layer.lora_A.weight" in saved  # gate_up_proj, wrapped first, sits under down_proj's
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_moe("qwen3_moe")), tmp_path / "mine").eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-5
    stacks = {n: p.detach().clone() for n, p in lm.graph_module.named_parameters() if p.dim() == 3}
    lm.merge()
    with torch.no_grad():
        assert rel_err(lm(ids).logits, want) < 1e-5
        ref_delta = pm.base_model.model.model.layers[0].mlp.experts.get_delta_weight("default")
    key = "model.layers.0.mlp.experts.down_proj"
    assert rel_err(lm.adapters.unit("default", key).delta_weight(), ref_delta) < 1e-6
    lm.unmerge()
    for n, p in lm.graph_module.named_parameters():
        if n in stacks:
            assert torch.equal(p, stacks[n]), n
    merged = lm.merge_and_unload()
    with torch.no_grad():
        assert rel_err(merged(ids).logits, want) < 1e-5


def test_training_moves_only_adapters_and_lowers_the_loss():
    ids = _ids(4, 9)
    lm = lora_fx.lorafy(hf_moe("qwen3_moe"), Rule(EXPERT_PARAMS, r=4, kinds="param"), example_inputs=(ids,))
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, hf_moe("qwen3_moe")(ids).logits)  # init leaves outputs unchanged
    lm.train()
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = lm(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert {id(p) for p in lm.parameters() if p.requires_grad} == {id(p) for p in lm.adapters.parameters()}


def test_compiled_expert_branch_has_no_graph_break_and_trains():
    from torch._dynamo.utils import counters

    ids = _ids()
    lm = lora_fx.lorafy(hf_moe("qwen3_moe"), Rule(EXPERT_PARAMS, r=4, kinds="param", init=False),
                        example_inputs=(ids,))
    loss = lm(ids, labels=ids).loss
    loss.backward()
    want = {n: p.grad.clone() for n, p in lm.adapters.named_parameters()}
    lm.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    compiled = lora_fx.compile(lm)
    got = compiled(ids, labels=ids).loss
    got.backward()
    assert rel_err(got, loss) < 1e-5
    for name, p in lm.adapters.named_parameters():
        assert rel_err(p.grad, want[name]) < 1e-4, name
    assert sum(counters["graph_break"].values()) == 0


def test_loop_over_experts_under_symbolic_trace_equals_peft(tmp_path):
    model = LoopModel().eval()
    x = torch.randn(5, 8)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["inp"], target_parameters=["moe.w_in", "moe.w_out"],
                             init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(tmp_path)
    lm = lora_fx.from_peft(copy.deepcopy(model), tmp_path)
    ops = [t.op for t in lm.targets if t.kind == "param" and t.geometry.experts > 1]
    assert len(ops) == 6 and "F.linear on w_in[2] (E=3)" in ops  # one target node per expert, one key each stack
    with torch.no_grad():
        assert rel_err(lm(x), pm(x)) < 1e-5
    lm.merge()
    with torch.no_grad():
        assert rel_err(lm(x), pm(x)) < 1e-5


def test_two_dimensional_parameters_as_peft_factors_them(tmp_path):
    """PEFT's MlpUsingParameters: ``x @ W`` with W [in, out] is factored as W + s·B A (A [r, W.shape[1]]),
    a module's weight by its parameter path next to a module target."""
    model = MlpUsingParameters().eval()
    x = torch.randn(6, 10)
    config = peft.LoraConfig(r=3, target_modules=["lin2"], target_parameters=["lin0.weight", "lin1.weight"],
                             init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(tmp_path / "peft")
    lm = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(lm(x), pm(x)) < 1e-5
    assert lm.adapters.unit("default", "lin0.weight").lora_A.shape == (3, 20)
    lm.save_pretrained(tmp_path / "mine")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine").eval()
    with torch.no_grad():
        assert rel_err(back(x), pm(x)) < 1e-5
    lm.merge()
    with torch.no_grad():
        assert rel_err(lm(x), pm(x)) < 1e-5


def test_expert_targets_need_the_param_kind_and_refuse_routing():
    ids = _ids()
    with pytest.raises(RuleError, match="kinds='param'"):
        lora_fx.lorafy(hf_moe("qwen3_moe"), Rule("mlp.experts.gate_up_proj"), example_inputs=(ids,))
    lm = lora_fx.lorafy(hf_moe("qwen3_moe"), Rule("gate_up_proj", kinds="param"), example_inputs=(ids,))
    assert {t.key for t in lm.targets if t.kind == "param" and "experts" in t.key} >= {
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"}
    lm.add_adapter("other", Rule("gate_up_proj", kinds="param"))
    with pytest.raises(AdapterError, match="target_parameters"):
        lm.build_adapter_bank()
    with pytest.raises(AdapterError, match="target_parameters.*weighted combination"):
        lm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    with pytest.raises(AdapterError, match="adapter_names|target_parameters"):
        lm(ids, adapter_names=["default", "other"])


def test_hot_swap_refuses_expert_targets(tmp_path):
    ids = _ids()
    lm = lora_fx.lorafy(hf_moe("qwen3_moe"), Rule("gate_up_proj", kinds="param"), example_inputs=(ids,))
    lm.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="hotswap=True.*target_parameters"):
        lm.load_adapter(tmp_path, "default", hotswap=True)
