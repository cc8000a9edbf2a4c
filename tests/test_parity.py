"""The insert pass over the zoo: identity at init, PEFT parity on random adapters, PEFT's key set."""

import pytest
import torch
from helpers import peft_keys, peft_twin, rel_err, run

import lora_fx
from lora_fx import Rule


def test_init_leaves_outputs_unchanged(case):
    ref = run(case.build(), case)
    lm = lora_fx.lorafy(case.build(), Rule(case.targets, r=4, alpha=8), **case.lorafy_kwargs())
    assert torch.equal(run(lm, case), ref)
    assert all(torch.count_nonzero(u.lora_A if u.kind == "embedding" else u.lora_B) == 0
               for _, u in lm.adapters.iter_units())


def test_random_adapters_match_peft(peft_case):
    c = peft_case
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, alpha=8, init=False), **c.lorafy_kwargs())
    pm = peft_twin(c, lm, r=4, lora_alpha=8)
    ours, theirs, base = run(lm, c), run(pm, c), run(c.build(), c)
    assert rel_err(ours, base) > 1e-3  # the adapters do change the output
    assert rel_err(ours, theirs) < 1e-6


def test_report_lists_exactly_peft_targets(peft_case):
    c = peft_case
    lm = lora_fx.lorafy(c.build(), c.targets, **c.lorafy_kwargs())
    pm = peft_twin(c, lm)
    rows = lm.report().rows
    assert sorted(r["key"] for r in rows) == peft_keys(pm)
    for row in rows:
        unit = lm.adapters.unit("default", row["key"])
        assert row["params"] == unit.lora_A.numel() + unit.lora_B.numel()
        assert row["r"] == 8 and row["alpha"] == 8 and row["scaling"] == 1.0
        module = pm.base_model.model.get_submodule(row["key"]).base_layer
        kind = {"Embedding": "embedding", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv"}
        assert row["kind"] == kind.get(type(module).__name__, "linear")


def test_functional_model_matches_closed_form():
    """F.linear on the model's own parameters: y = (W + s·B A) x + b, which PEFT cannot target."""
    from zoo import ZOO

    c = ZOO["functional"]
    model = c.build()
    lm = lora_fx.lorafy(model, Rule(["w1", "w2"], r=3, alpha=6, init=False))
    x = c.inputs()[0]
    w1 = model.w1 + 2.0 * lm.unit("w1").lora_B @ lm.unit("w1").lora_A
    w2 = model.w2 + 2.0 * lm.unit("w2").lora_B @ lm.unit("w2").lora_A
    ref = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w1, model.b1)), w2)
    assert rel_err(run(lm, c), ref.detach()) < 1e-6
    assert [r["op"] for r in lm.report().rows] == ["F.linear", "F.linear"]


@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=16, use_rslora=True),
    dict(r=2, lora_alpha=4, rank_pattern={"fc2": 6}, alpha_pattern={"head": 3}),
])
def test_peft_config_as_rules_matches_peft(cfg):
    from zoo import ZOO

    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), __import__("peft").LoraConfig(target_modules=c.targets, init_lora_weights=False,
                                                                  **cfg))
    pm = peft_twin(c, lm, **cfg)
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6
    if "rank_pattern" in cfg:
        assert lm.unit("fc2").r == 6 and lm.unit("head").alpha == 3 and lm.unit("fc1").r == 2


def test_regex_target_modules_match_peft():
    from zoo import ZOO

    c = ZOO["llama"]
    regex = r".*layers\.1\.self_attn\.(q|v)_proj"
    lm = lora_fx.lorafy(c.build(), __import__("peft").LoraConfig(target_modules=regex, init_lora_weights=False),
                        **c.lorafy_kwargs())
    pm = peft_twin(c, lm, target_modules=regex)
    assert sorted(r["key"] for r in lm.report().rows) == peft_keys(pm) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6


def test_new_shape_runs_after_capture(case):
    lm = lora_fx.lorafy(case.build(), Rule(case.targets, init=False), **case.lorafy_kwargs())
    other = case.other_inputs_fn()
    base = case.build()
    out, ref = run(lm, case, other), run(base, case, other)
    assert out.shape == ref.shape


def test_bf16_base_gets_float32_adapters_like_peft():
    from zoo import ZOO

    c = ZOO["mlp"]
    model = c.build().to(torch.bfloat16)
    lm = lora_fx.lorafy(model, Rule(c.targets, init=False))
    assert lm.unit("fc1").lora_A.dtype == torch.float32
    x = (c.inputs()[0].to(torch.bfloat16),)
    pm = peft_twin(c, lm, dtype=torch.bfloat16)  # PEFT's autocast_adapter_dtype: float32 adapters too
    assert pm.base_model.model.fc1.lora_A["default"].weight.dtype == torch.float32
    ours = run(lm, c, x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, run(pm, c, x))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_all_linear_matches_peft(name):
    from peft import LoraConfig
    from zoo import ZOO

    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), LoraConfig(target_modules="all-linear", init_lora_weights=False),
                        **c.lorafy_kwargs())
    pm = peft_twin(c, lm, target_modules="all-linear")
    assert sorted(r["key"] for r in lm.report().rows) == peft_keys(pm)
    assert "lm_head" not in {r["key"] for r in lm.report().rows}
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6


def test_layers_to_transform_matches_peft():
    from peft import LoraConfig
    from zoo import ZOO

    c = ZOO["llama"]
    cfg = dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")
    lm = lora_fx.lorafy(c.build(), LoraConfig(init_lora_weights=False, **cfg), **c.lorafy_kwargs())
    pm = peft_twin(c, lm, **cfg)
    assert sorted(r["key"] for r in lm.report().rows) == peft_keys(pm) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6
