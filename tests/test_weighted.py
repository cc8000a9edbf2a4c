"""add_weighted_adapter: PEFT's types against PEFT where its math is right (cat, the SVD types), and against the
closed form everywhere (linear exact, rsLoRA right, scaling once)."""

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, get_peft_model
from zoo import ZOO

import lora_fx
from lora_fx import AdapterError, Rule


def _pair(rslora=False, rank_b=8):
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, alpha=8, init=False, use_rslora=rslora))
    lm.add_adapter("b", Rule(c.targets[:2], r=rank_b, alpha=4, init=False, use_rslora=rslora))
    return c, lm


def _peft(c, lm):
    pm = get_peft_model(c.build(), LoraConfig(target_modules=c.targets, r=4, lora_alpha=8))
    pm.add_adapter("b", LoraConfig(target_modules=c.targets[:2], r=lm.unit("fc1", "b").r, lora_alpha=4))
    with torch.no_grad():
        for name, unit in lm.adapters.iter_units():
            mod = pm.base_model.model.get_submodule(unit.key)
            mod.lora_A[name].weight.copy_(unit.lora_A)
            mod.lora_B[name].weight.copy_(unit.lora_B)
    return pm.eval()


def _delta(lm, name, key):
    return lm.unit(key, name).delta_weight()


@pytest.mark.parametrize("kind", ["cat", "svd", "ties_svd", "magnitude_prune_svd"])
def test_equals_peft_where_peft_is_right(kind):
    c, lm = _pair(rank_b=4)
    pm = _peft(c, lm)
    kw = dict(density=0.6) if kind.endswith("prune_svd") or kind.startswith("ties") else {}
    kw.update(svd_rank=3) if kind.endswith("svd") else None
    lm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind, **kw)
    pm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind, **kw)
    lm.set_adapter("mix")
    pm.set_adapter("mix")
    x = c.inputs()[0]
    with torch.no_grad():
        assert rel_err(lm(x), pm(x)) < 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_is_the_exact_weighted_sum(rslora):
    c, lm = _pair(rslora=rslora)
    assert lm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="linear") == {}
    for key in c.targets:
        want = 0.7 * _delta(lm, "default", key) + (-0.4 * _delta(lm, "b", key) if key in c.targets[:2] else 0)
        assert rel_err(_delta(lm, "mix", key), want) < 1e-6
    assert lm.unit("fc1", "mix").scaling == 1.0


def test_peft_linear_has_cross_terms_ours_does_not():
    c, lm = _pair(rank_b=4)
    pm = _peft(c, lm)
    lm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    exact = 0.5 * _delta(lm, "default", "fc1") + 0.5 * _delta(lm, "b", "fc1")
    theirs = pm.base_model.model.fc1.get_delta_weight("mix")
    assert rel_err(_delta(lm, "mix", "fc1"), exact) < 1e-6
    assert rel_err(theirs, exact) > 1e-2


@pytest.mark.parametrize("kind", ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_svd_types_are_the_truncated_svd_of_the_merged_task_vectors(kind):
    c, lm = _pair()
    density = None if kind == "svd" else 0.5
    torch.manual_seed(0)
    errors = lm.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type=kind, svd_rank=2,
                                     density=density)
    assert set(errors) == set(c.targets)
    for key in c.targets:
        u = lm.unit(key, "mix")
        assert u.r <= 2 and u.scaling == 1.0
        if kind == "svd":
            d = _delta(lm, "default", key) + (0.5 * _delta(lm, "b", key) if key in c.targets[:2] else 0)
            s = torch.linalg.svdvals(d)
            assert abs(errors[key] - (s[2:].square().sum() / s.square().sum()).sqrt().item()) < 1e-4
            assert abs(errors[key] - rel_err(_delta(lm, "mix", key), d)) < 1e-4
    assert "reconstruction error" in str(lm.report())


def test_factor_types_follow_peft_definition_with_scaling_once():
    c, lm = _pair(rank_b=4)
    lm.add_weighted_adapter(["default", "b"], [1.0, 2.0], "mix", combination_type="magnitude_prune", density=1.0)
    a0, a1 = lm.unit("fc1", "default"), lm.unit("fc1", "b")
    s0, s1 = 1.0 * a0.scaling, 2.0 * a1.scaling
    want_a = s0 ** 0.5 * a0.lora_A + s1 ** 0.5 * a1.lora_A
    want_b = s0 ** 0.5 * a0.lora_B + s1 ** 0.5 * a1.lora_B
    mix = lm.unit("fc1", "mix")
    assert rel_err(mix.lora_A, want_a) < 1e-6 and rel_err(mix.lora_B, want_b) < 1e-6
    with pytest.raises(AdapterError, match="equal ranks"):
        _pair(rank_b=8)[1].add_weighted_adapter(["default", "b"], [1, 1], "m", combination_type="ties", density=0.5)


def test_bad_arguments_change_nothing():
    c, lm = _pair()
    for kwargs, match in ((dict(combination_type="avg"), "combination_type"),
                          (dict(combination_type="ties"), "density"),
                          (dict(combination_type="svd", svd_rank=0), "svd_rank")):
        with pytest.raises(AdapterError, match=match):
            lm.add_weighted_adapter(["default", "b"], [1, 1], "mix", **kwargs)
    with pytest.raises(AdapterError, match="one weight per adapter"):
        lm.add_weighted_adapter(["default", "b"], [1], "mix")
    with pytest.raises(AdapterError, match="No adapter named"):
        lm.add_weighted_adapter(["default", "zz"], [1, 1], "mix")
    assert lm.adapters.names == ["default", "b"]
    lm.build_adapter_bank()
    lm.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="cat")  # a new bank slot
    assert lm.adapter_bank.slots == ["default", "b", "mix"]
    x = c.inputs()[0]
    with torch.no_grad():
        both = lm(x, adapter_names=["mix"] * 4)
        lm.remove_adapter_bank()
        lm.set_adapter(["default", "b"])
        assert rel_err(both, lm(x)) < 1e-5
