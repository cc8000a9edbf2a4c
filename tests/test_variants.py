"""LoRA variants against PEFT: DoRA (linear, Conv1D, embedding, conv) forward, train-mode dropout,
merge, checkpoints both ways; rsLoRA and init schemes."""

import pytest
import torch
from helpers import rel_err, run
from peft import LoraConfig, PeftModel, get_peft_model
from zoo import ZOO

import lora_fx
from lora_fx import Rule


def _peft_dora(case, tmp_path, **cfg):
    torch.manual_seed(3)
    pm = get_peft_model(case.build(), LoraConfig(target_modules=case.targets, use_dora=True, init_lora_weights=False,
                                                 fan_in_fan_out=case.fan_in_fan_out, **cfg)).eval()
    pm.save_pretrained(tmp_path)
    return pm


@pytest.mark.parametrize("name", ["mlp", "cnn", "embed", "llama", "gpt2", "bert"])
def test_dora_matches_peft_and_checkpoints_interchange(name, tmp_path):
    c = ZOO[name]
    pm = _peft_dora(c, tmp_path / "peft", lora_dropout=0.1)
    lm = lora_fx.from_peft(c.build(), tmp_path / "peft", **c.lorafy_kwargs()).eval()
    assert all(u.variant.name == "dora" and u.lora_magnitude_vector is not None for _, u in lm.adapters.iter_units())
    ours = run(lm, c)
    assert rel_err(ours, run(pm, c)) < 1e-6
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(c.build(), tmp_path / "ours").eval()
    assert rel_err(run(back, c), ours) < 1e-6


@pytest.mark.parametrize("name", ["mlp", "cnn", "llama"])
def test_dora_train_mode_dropout_matches_peft(name, tmp_path):
    """In training with dropout, DoRA recomputes W·dropout(x); same seed, same masks, same outputs."""
    c = ZOO[name]
    pm = _peft_dora(c, tmp_path, lora_dropout=0.3)
    lm = lora_fx.from_peft(c.build(), tmp_path, **c.lorafy_kwargs())
    pm.train(), lm.train()
    x = c.inputs()
    torch.manual_seed(7)
    ours = lm(*x)
    torch.manual_seed(7)
    theirs = pm(*x)
    ours, theirs = (o if isinstance(o, torch.Tensor) else o[0] for o in (ours, theirs))
    assert rel_err(ours.detach(), theirs.detach()) < 1e-6


@pytest.mark.parametrize("name", ["mlp", "cnn", "embed", "llama"])
def test_dora_init_is_identity_and_merge_round_trip(name):
    c = ZOO[name]
    model = c.build()
    base = run(model, c)
    lm = lora_fx.lorafy(model, Rule(c.targets, r=4, use_dora=True), **c.lorafy_kwargs())
    assert rel_err(run(lm, c), base) < 1e-6
    for _, unit in lm.adapters.iter_units():  # a trained-looking adapter: B and m moved
        torch.nn.init.normal_(unit.lora_A if unit.kind == "embedding" else unit.lora_B, std=0.1)
        with torch.no_grad():
            unit.lora_magnitude_vector.mul_(1.1)
    before = run(lm, c)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm.merge()
    assert "dora" not in lm.code and rel_err(run(lm, c), before) < 1e-5
    lm.unmerge()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    gm = lm.merge_and_unload()
    assert rel_err(run(gm, c), before) < 1e-5


def test_dora_trains_magnitude():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, use_dora=True, init=False))
    out = run(lm, c).requires_grad_(False)
    loss = (lm(*c.inputs()) - out - 1).square().mean()
    loss.backward()
    unit = lm.unit("fc1")
    assert unit.lora_magnitude_vector.grad is not None and unit.lora_magnitude_vector.grad.abs().sum() > 0
    assert any(p is unit.lora_magnitude_vector for p in lm.trainable_parameters())


def test_gaussian_init_matches_peft_distribution_and_identity():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(["fc1"], r=24, init="gaussian"))
    unit = lm.unit("fc1")
    assert torch.count_nonzero(unit.lora_B) == 0
    assert abs(unit.lora_A.std().item() - 1 / 24) < 0.2 / 24  # PEFT: A ~ N(0, 1/r)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_match_peft(bias, tmp_path):
    c = ZOO["qwen2"]  # q/k/v have biases
    cfg = dict(target_modules=["q_proj", "v_proj"], bias=bias, init_lora_weights=False)
    torch.manual_seed(3)
    pm = get_peft_model(c.build(), LoraConfig(**cfg)).eval()
    with torch.no_grad():  # trained biases
        for n, p in pm.named_parameters():
            if p.requires_grad and "bias" in n:
                p.add_(torch.randn_like(p))
    peft_trainable = {n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n}
    pm.save_pretrained(tmp_path / "peft")
    lm = lora_fx.from_peft(c.build(), tmp_path / "peft", **c.lorafy_kwargs())
    ours = set(lm.bias_parameters("default"))
    assert len(ours) == (6 if bias == "all" else 4)  # q, k, v (all) or q, v (lora_only) in two layers
    assert {n.replace("base_model.model.", "") for n in ours} == {n.replace("base_model.model.", "")
                                                                   for n in peft_trainable}
    assert len(lm.trainable_parameters()) == sum(p.requires_grad for p in pm.parameters())
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(c.build(), tmp_path / "ours").eval()
    assert rel_err(run(back, c), run(pm, c)) < 1e-6


@pytest.mark.parametrize("name,saved", [("mlp", ["head"]), ("bert", ["pooler"]), ("llama", ["lm_head"])])
def test_modules_to_save_match_peft(name, saved, tmp_path):
    c = ZOO[name]
    cfg = dict(target_modules=c.targets, modules_to_save=saved, init_lora_weights=False)
    torch.manual_seed(3)
    pm = get_peft_model(c.build(), LoraConfig(**cfg)).eval()
    with torch.no_grad():  # a trained copy
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    model = c.build()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm = lora_fx.from_peft(model, tmp_path / "peft", **c.lorafy_kwargs())
    assert sum(p.requires_grad for p in lm.parameters()) == sum(p.requires_grad for p in pm.parameters())
    assert not any(saved[0] in r["key"].split(".") for r in lm.report().rows)  # no LoRA inside a saved module
    ours = run(lm, c)
    assert rel_err(ours, run(pm, c)) < 1e-6
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # the original stays frozen
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(c.build(), tmp_path / "ours").eval()
    assert rel_err(run(back, c), ours) < 1e-6
    gm = lm.merge_and_unload()  # the trained copy replaces the original, as in PEFT
    assert rel_err(run(gm, c), ours) < 1e-5


def test_modules_to_save_that_matches_nothing_is_refused():
    c = ZOO["mlp"]
    with pytest.raises(lora_fx.RuleError, match="classifier"):
        lora_fx.lorafy(c.build(), LoraConfig(target_modules=["fc1"], modules_to_save=["classifier"]))


@pytest.mark.parametrize("init,name", [("pissa", "mlp"), ("pissa", "llama"), ("pissa", "gpt2"), ("olora", "mlp"),
                                       ("olora", "llama"), ("pissa_niter_4", "llama")])
def test_weight_rewriting_inits_match_peft(init, name, tmp_path):
    """PiSSA / OLoRA: same A, B and residual base as PEFT; outputs unchanged at init; merge folds back to W;
    checkpoints (after training) load both ways, PEFT re-deriving the residual from the original weights."""
    c = ZOO[name]
    cfg = dict(target_modules=c.targets, init_lora_weights=init, r=4, lora_alpha=8)
    base = run(c.build(), c)
    torch.manual_seed(5)
    pm = get_peft_model(c.build(), LoraConfig(fan_in_fan_out=c.fan_in_fan_out, **cfg)).eval()
    torch.manual_seed(5)
    model = c.build()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm = lora_fx.lorafy(model, LoraConfig(**cfg), **c.lorafy_kwargs())
    assert rel_err(run(lm, c), base) < 1e-5 and rel_err(run(lm, c), run(pm, c)) < 1e-5
    key = sorted(lm.adapters.units("default"))[0]
    peft_mod = pm.base_model.model.get_submodule(key)
    if init != "pissa_niter_4":  # the randomized SVD draws in a different order than PEFT's
        assert rel_err(lm.unit(key).lora_A, peft_mod.lora_A["default"].weight) < 1e-5
        assert rel_err(model.get_submodule(key).weight, peft_mod.base_layer.weight) < 1e-5  # the residual
    lm.merge()
    for n, p in model.named_parameters():  # W_res + s·B A = W
        assert rel_err(p.detach(), original[n]) < 1e-5, n
    lm.unmerge()
    if init == "pissa_niter_4":
        return  # randomized: PEFT's re-derivation on load draws other random vectors
    with torch.no_grad():  # "train" the adapter, then interchange checkpoints
        for _, unit in lm.adapters.iter_units():
            unit.lora_B.add_(0.01 * torch.randn_like(unit.lora_B))
    trained = run(lm, c)
    lm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(c.build(), tmp_path).eval()
    assert rel_err(run(back, c), trained) < 1e-5
    again = lora_fx.from_peft(c.build(), tmp_path, **c.lorafy_kwargs())
    assert rel_err(run(again, c), trained) < 1e-5


def test_weight_rewriting_init_refused_for_embeddings():
    c = ZOO["embed"]
    with pytest.raises(lora_fx.RuleError, match="linear layers only"):
        lora_fx.lorafy(c.build(), Rule(["emb"], init="pissa"))


@pytest.mark.parametrize("name,targets", [("mlp", ["fc1", "head"]), ("cnn", None), ("qwen2", ["q_proj", "v_proj"]),
                                          ("gpt2", None)])
def test_lora_bias_matches_peft(name, targets, tmp_path):
    c = ZOO[name]
    targets = targets or c.targets
    torch.manual_seed(3)
    pm = get_peft_model(c.build(), LoraConfig(target_modules=targets, lora_bias=True, init_lora_weights=False,
                                              fan_in_fan_out=c.fan_in_fan_out)).eval()
    pm.save_pretrained(tmp_path / "peft")
    model = c.build()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if "bias" in n}
    lm = lora_fx.from_peft(model, tmp_path / "peft", **c.lorafy_kwargs())
    ours = run(lm, c)
    assert rel_err(ours, run(pm, c)) < 1e-6
    lm.merge()  # base bias += s·b_B
    assert rel_err(run(lm, c), ours) < 1e-5
    lm.unmerge()
    assert all(torch.equal(p, biases[n]) for n, p in model.named_parameters() if "bias" in n)
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(c.build(), tmp_path / "ours").eval()
    assert rel_err(run(back, c), ours) < 1e-6


def test_lora_bias_merge_without_base_bias_is_refused():
    c = ZOO["mlp"]  # fc2 has no bias
    lm = lora_fx.lorafy(c.build(), Rule(["fc2"], lora_bias=True, init=False))
    code = lm.code
    with pytest.raises(lora_fx.MergeError, match="'fc2' has no base bias"):
        lm.merge()
    assert lm.code == code and lm.merged_adapters == []


@pytest.mark.parametrize("cfg", [
    dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=8, lora_alpha=4),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["q_proj", "k_proj", "down_proj"], exclude_modules=["layers.1.mlp.down_proj"],
         rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 5}),
    dict(target_modules=["q_proj", "o_proj"], init_lora_weights="gaussian"),
], ids=["rslora", "all-linear", "layers_to_transform", "patterns", "gaussian"])
def test_config_options_round_trip_with_peft(cfg, tmp_path):
    """Each option: PEFT's checkpoint (random nonzero weights) loads and matches, ours loads in PEFT and
    matches, and merging matches the unmerged output."""
    c = ZOO["llama"]
    cfg = {"init_lora_weights": False, **cfg}
    torch.manual_seed(3)
    pm = get_peft_model(c.build(), LoraConfig(**cfg)).eval()
    if cfg["init_lora_weights"] == "gaussian":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_()
    pm.save_pretrained(tmp_path / "peft")
    lm = lora_fx.from_peft(c.build(), tmp_path / "peft", **c.lorafy_kwargs())
    ours = run(lm, c)
    assert rel_err(ours, run(pm, c)) < 1e-6
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(c.build(), tmp_path / "ours").eval()
    assert rel_err(run(back, c), ours) < 1e-6
    lm.merge()
    assert rel_err(run(lm, c), ours) < 1e-5


def test_orthogonal_init_draws_peft_s_factors_and_leaves_outputs_unchanged():
    import copy

    model = ZOO["mlp"].build()
    config = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights="orthogonal")
    torch.manual_seed(3)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    torch.manual_seed(3)
    lm = lora_fx.lorafy(copy.deepcopy(model), LoraConfig(**config))
    for key in ("fc1", "fc2"):
        layer = pm.base_model.model.get_submodule(key)
        assert torch.equal(lm.unit(key).lora_A, layer.lora_A["default"].weight)
        assert torch.equal(lm.unit(key).lora_B, layer.lora_B["default"].weight)
        assert lm.unit(key).lora_B.abs().sum() > 0
    x = ZOO["mlp"].inputs()[0]
    with torch.no_grad():
        assert torch.allclose(lm(x), model(x), atol=1e-6)
    with pytest.raises(lora_fx.RuleError, match="even rank"):
        lora_fx.lorafy(ZOO["mlp"].build(), Rule("fc1", r=3, init="orthogonal"))
    with pytest.raises(lora_fx.RuleError, match="linear layers"):
        lora_fx.lorafy(ZOO["cnn"].build(), Rule("c1", r=2, init="orthogonal"))


def test_mica_freezes_b_from_the_minor_singular_vectors_as_peft_does(tmp_path):
    import copy

    model = ZOO["mlp"].build()
    config = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights="mica")
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    lm = lora_fx.lorafy(copy.deepcopy(model), LoraConfig(**config))
    assert sorted(n for n, p in pm.named_parameters() if p.requires_grad) == [
        "base_model.model.fc1.lora_A.default.weight", "base_model.model.fc2.lora_A.default.weight"]
    assert {id(p) for p in lm.trainable_parameters()} == {id(lm.unit(k).lora_A) for k in ("fc1", "fc2")}
    x = ZOO["mlp"].inputs()[0]
    for m in (pm, lm):  # one identical SGD step on each
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m(x).square().mean().backward()
        opt.step()
    for key in ("fc1", "fc2"):
        layer = pm.base_model.model.get_submodule(key)
        assert torch.allclose(lm.unit(key).lora_B, layer.lora_B["default"].weight, atol=1e-6)
        assert rel_err(lm.unit(key).lora_A, layer.lora_A["default"].weight) < 1e-5
    with torch.no_grad():
        assert rel_err(lm(x), pm(x)) < 1e-5
    lm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert rel_err(back(x), lm(x)) < 1e-5
    with pytest.raises(lora_fx.RuleError, match="r <= min"):
        lora_fx.lorafy(ZOO["mlp"].build(), Rule("fc2", r=64, init="mica"))


def test_bdlora_equals_peft_from_init_to_checkpoints(tmp_path):
    """PEFT's BD-LoRA: block-diagonal A on o/down, B on q/up (2 blocks): the same draws at init, the same outputs,
    merge, and checkpoints both ways."""
    import copy

    from peft.tuners.lora.config import BdLoraConfig

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]

    def config(init):
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                          init_lora_weights=init, use_bdlora=BdLoraConfig(
                              target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "up_proj"],
                              nblocks=2))
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(model), config(False)).eval()
    torch.manual_seed(5)
    lm = lora_fx.lorafy(copy.deepcopy(model), config(False), example_inputs=(ids,)).eval()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert torch.equal(unit.lora_A, layer.lora_A["default"].weight), key
        assert torch.equal(unit.lora_B, layer.lora_B["default"].weight), key
    assert lm.unit("model.layers.0.self_attn.o_proj").lora_A.shape == (4, 16)  # A block-diagonal: [r, in / 2]
    assert lm.unit("model.layers.0.self_attn.q_proj").lora_B.shape == (32, 2)  # B block-diagonal: [out, r / 2]
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    lm = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(ids,)).eval()
    with torch.no_grad():
        want = pm(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-6
        lm.merge()
        assert rel_err(lm(ids).logits, want) < 1e-5
        lm.unmerge()
    lm.save_pretrained(tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine").eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-6
    with pytest.raises(lora_fx.RuleError, match="matches neither"):
        lora_fx.lorafy(copy.deepcopy(model), LoraConfig(r=4, target_modules=["k_proj"], use_bdlora=BdLoraConfig(
            target_modules_bd_a=["o_proj"], nblocks=2)), example_inputs=(ids,))
    with pytest.raises(lora_fx.RuleError, match="not divisible"):
        lora_fx.lorafy(copy.deepcopy(model), Rule("q_proj", r=3, block_diagonal=("B", 2)), example_inputs=(ids,))

