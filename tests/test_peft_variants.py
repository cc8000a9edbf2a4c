"""PEFT 0.21's newer forward variants against PEFT: KaSA, VeLoRA, MonteCLoRA, Arrow, aLoRA (draws at init, outputs,
gradients, merges, checkpoints both ways)."""

import copy

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from zoo import ZOO

import lora_fx
from lora_fx import Rule


def _nonzero_b(*models):
    """The same nonzero B in PEFT's and lora_fx's copies (drawn by shape), so the branches act."""
    with torch.no_grad():
        for m in models:
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)


def _same_loss_and_grads(pm, lm, ids, factors):
    """The causal-LM loss of both models agrees, and so do the gradients of each unit's ``factors``."""
    losses = [m(input_ids=ids, labels=ids).loss for m in (pm, lm)]
    assert rel_err(losses[1], losses[0]) < 1e-6
    for loss in losses:
        loss.backward()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        for f in factors:
            assert rel_err(getattr(unit, f).grad, getattr(layer, f)["default"].weight.grad) < 1e-5, (key, f)


def test_kasa_equals_peft_from_truncation_to_checkpoints(tmp_path):
    """PEFT's KaSA: the same truncated base weights and draws at init, the same outputs, gradients and regularizer
    with nonzero B, merge, checkpoints both ways; the variant refuses what PEFT refuses."""
    from peft.tuners.lora.config import KasaConfig

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        kasa_config=KasaConfig(beta=1e-3, gamma=1e-2))
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(5)
    lm = lora_fx.lorafy(copy.deepcopy(model), config, example_inputs=(ids,))
    base = lm.get_base_model()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert torch.equal(unit.lora_A, layer.lora_A["default"].weight), key
        assert torch.equal(unit.lora_diag, layer.lora_diag["default"]), key
        assert torch.equal(base.get_submodule(key).weight, layer.base_layer.weight), key  # W without its r minor
        assert not torch.equal(base.get_submodule(key).weight, model.get_submodule(key).weight)
    _nonzero_b(pm, lm)
    losses = [m(ids, labels=ids).loss + (m.base_model._get_kasa_loss() if m is pm else m.variant_loss())
              for m in (pm, lm)]
    assert rel_err(losses[1], losses[0]) < 1e-6
    for loss in losses:
        loss.backward()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        pairs = [(unit.lora_A, layer.lora_A["default"].weight), (unit.lora_B, layer.lora_B["default"].weight),
                 (unit.lora_diag, layer.lora_diag["default"])]
        for mine, theirs in pairs:
            assert rel_err(mine.grad, theirs.grad) < 1e-5, key
    pm.eval(), lm.eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pm(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-6
        loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(ids,)).eval()
        assert rel_err(loaded(ids).logits, want) < 1e-6
        loaded.merge()
        assert rel_err(loaded(ids).logits, want) < 1e-5
        loaded.unmerge()
        assert rel_err(loaded(ids).logits, want) < 1e-6
    loaded.save_pretrained(tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine").eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-6
    assert loaded.peft_config["default"].kasa_config.gamma == 1e-2
    with pytest.raises(lora_fx.AdapterError, match="KaSA rewrites the base weights"):
        loaded.add_adapter("plain", Rule("o_proj", r=2))
    with pytest.raises(lora_fx.RuleError, match="r < min"):
        lora_fx.lorafy(ZOO["mlp"].build(), Rule("head", r=5, kasa=True))
    with pytest.raises(lora_fx.RuleError, match="KaSA on"):
        lora_fx.lorafy(ZOO["gpt2"].build(), Rule("c_attn", r=2, kasa=True), **ZOO["gpt2"].lorafy_kwargs())


def test_kasa_training_lowers_the_regularized_loss():
    c = ZOO["llama"]
    ids = c.inputs()[0]
    lm = lora_fx.lorafy(c.build(), Rule(["q_proj", "v_proj"], r=4, kasa=(1e-3, 1e-2)), example_inputs=(ids,))
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = lm(ids, labels=ids).loss + lm.variant_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(u.lora_diag.grad is not None for u in lm.adapters.units("default").values())


@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once", "random"])
def test_velora_gradients_and_projection_equal_peft(init_type, tmp_path):
    """PEFT's VeLoRA: the same forward, the same compressed-activation gradients of A (exact ones for B), the same
    projection vector after each training step, plain LoRA in eval; checkpoints both ways."""
    from peft.tuners.lora.config import VeloraConfig

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        velora_config=VeloraConfig(num_groups=5, scale=0.5, init_type=init_type))
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(model), config).train()
    torch.manual_seed(5)
    lm = lora_fx.lorafy(copy.deepcopy(model), config, example_inputs=(ids,)).train()
    _nonzero_b(pm, lm)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (pm, lm)]
    for step in range(2):
        for m, opt in zip((pm, lm), opts):
            opt.zero_grad()
            m(ids, labels=(ids + step) % 64).loss.backward()
        for key, unit in lm.adapters.units("default").items():
            layer = pm.base_model.model.get_submodule(key)
            assert torch.allclose(unit.dropout.embed, layer.lora_velora_embed["default"], atol=1e-6), key
            assert rel_err(unit.lora_A.grad, layer.lora_A["default"].weight.grad) < 1e-5, key
            assert rel_err(unit.lora_B.grad, layer.lora_B["default"].weight.grad) < 1e-5, key
        for opt in opts:
            opt.step()
    pm.eval(), lm.eval()
    with torch.no_grad():
        want = pm(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-5
    lm.save_pretrained(tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine").eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-5
    for key, unit in lm.adapters.units("default").items():
        assert torch.equal(back.base_model.model.get_submodule(key).lora_velora_embed["default"], unit.dropout.embed)
    pm.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(ids,)).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, want) < 1e-5
        loaded.merge()
        assert rel_err(loaded(ids).logits, want) < 1e-5
    assert loaded.peft_config["default"].velora_config.num_groups == 5


def test_monteclora_equals_peft_with_the_same_draws(tmp_path):
    """MonteCLoRA: PEFT's draws at init (sampler priors and noise buffer), the same sampled training forwards,
    gradients (the priors' too) and variational loss over several steps (the buffer refilled), plain LoRA in eval,
    checkpoints both ways."""
    from peft.tuners.lora.config import MontecloraConfig

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        monteclora_config=MontecloraConfig(num_samples=3, buffer_size=2, use_entropy=True,
                                                           sample_scaler=0.05))
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(model), config).train()
    torch.manual_seed(5)
    lm = lora_fx.lorafy(copy.deepcopy(model), config, example_inputs=(ids,)).train()
    for key, unit in lm.adapters.units("default").items():
        sampler = pm.base_model.model.get_submodule(key).lora_monteclora_sampler["default"]
        assert torch.equal(unit.dropout.sampler.std_prior, sampler.std_prior), key
        assert torch.equal(unit.dropout.sampler._noise[1][1], sampler.sampler.buffer[1]["z_wishart"]), key
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (pm, lm)]
    for step in range(3):  # buffer_size 2: the third step refills it
        losses = []
        for m, opt in zip((pm, lm), opts):
            opt.zero_grad()
            torch.manual_seed(100 + step)  # a refill draws from the global generator: the same state for both
            out = m(ids, labels=ids)
            loss = out.loss + (m.base_model._get_monteclora_loss() if m is pm else m.variant_loss())
            loss.backward()
            losses.append(loss)
        assert rel_err(losses[1], losses[0]) < 1e-5, step
        for key, unit in lm.adapters.units("default").items():
            layer = pm.base_model.model.get_submodule(key)
            sampler = layer.lora_monteclora_sampler["default"]
            assert rel_err(unit.lora_A.grad, layer.lora_A["default"].weight.grad) < 1e-4, key
            assert rel_err(unit.dropout.sampler.std_prior.grad, sampler.std_prior.grad) < 1e-4, key
        for opt in opts:
            opt.step()
    assert lm._get_kasa_loss() == 0.0
    pm.eval(), lm.eval()
    with torch.no_grad():
        want = pm(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-5
    lm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path, example_inputs=(ids,)).eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-5
        assert rel_err(loaded(ids).logits, want) < 1e-5
    for key, unit in loaded.adapters.units("default").items():
        assert torch.equal(unit.dropout.sampler.std_prior, lm.unit(key).dropout.sampler.std_prior)
    assert loaded.peft_config["default"].monteclora_config.num_samples == 3


@pytest.mark.parametrize("use_gks", [False, True])
def test_arrow_routes_tokens_as_peft(use_gks, tmp_path):
    """Arrow: PEFT's create_arrow_model and ours from the same task (and general) adapter directories give the same
    per-token routed outputs; the router is neither merged nor saved."""
    from peft.tuners.lora.arrow import create_arrow_model as peft_arrow
    from peft.tuners.lora.config import ArrowConfig

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    paths = []
    for i in range(4):  # three task adapters and one general one, with nonzero B
        torch.manual_seed(20 + i)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
        pm.save_pretrained(tmp_path / f"a{i}")
        paths.append(str(tmp_path / f"a{i}"))
    config = dict(top_k=2, router_temperature=0.7, rng_seed=11, use_gks=use_gks)
    general = paths[3:] if use_gks else None
    theirs = peft_arrow(copy.deepcopy(model), paths[:3], ArrowConfig(**config), general).eval()
    ours = lora_fx.create_arrow_model(copy.deepcopy(model), paths[:3], ArrowConfig(**config), general,
                                      example_inputs=(ids,)).eval()
    assert ours.active_adapters == ["arrow_router"]
    with torch.no_grad():
        want = theirs(ids).logits
        assert rel_err(ours(ids).logits, want) < 1e-5
        ours.set_adapter("task_1")
        assert rel_err(ours(ids).logits, want) > 1e-3  # the router is not any one task adapter
        ours.set_adapter("arrow_router")
    assert torch.equal(ours.generate(ids, num_beams=2, max_new_tokens=4, pad_token_id=0),
                       theirs.generate(input_ids=ids, num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0))
    with pytest.raises(lora_fx.MergeError, match="Arrow"):
        ours.merge()
    with pytest.raises(lora_fx.CheckpointError, match="Arrow router"):
        ours.save_pretrained(tmp_path / "router")
    with pytest.raises(lora_fx.RuleError, match="top_k"):
        lora_fx.create_arrow_model(copy.deepcopy(model), paths[:1], ArrowConfig(top_k=2), example_inputs=(ids,))


def test_alora_activates_after_the_invocation_as_peft(tmp_path):
    """aLoRA: the adapter acts from the last invocation sequence of each row on (none: the base model), in the graph
    from input_ids: outputs, loss and gradients equal PEFT's; generation equals PEFT's; not merged; checkpoints
    both ways."""
    c = ZOO["llama"]
    model = c.build()
    ids = torch.randint(10, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 4:6] = torch.tensor([3, 5])
    ids[1, 2:4] = ids[1, 9:11] = torch.tensor([3, 5])  # the last occurrence counts; row 2 never invokes it
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                        alora_invocation_tokens=[3, 5], init_lora_weights=False)
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(model), config).eval()
    torch.manual_seed(1)
    lm = lora_fx.lorafy(copy.deepcopy(model), config, example_inputs=(ids,)).eval()
    _same_loss_and_grads(pm, lm, ids, ("lora_A",))
    with torch.no_grad():
        ours, base = lm(ids).logits, model(ids).logits
        assert rel_err(ours, pm(input_ids=ids).logits) < 1e-6
        assert torch.equal(ours[2], base[2]) and torch.equal(ours[0, :4], base[0, :4]) and torch.equal(
            ours[1, :9], base[1, :9])
        assert not torch.allclose(ours[0, 4:], base[0, 4:])
    assert torch.equal(lm.generate(ids, max_new_tokens=6),
                       pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    with pytest.raises(lora_fx.AdapterError, match="aLoRA"):
        lm.generate(ids, max_new_tokens=4, num_beams=2)
    with pytest.raises(lora_fx.MergeError, match="aLoRA"):
        lm.merge()
    lm.save_pretrained(tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine").eval()
    pm.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(ids,)).eval()
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, ours) < 1e-6
        assert rel_err(loaded(ids).logits, ours) < 1e-6


def qalora_config(**kw):
    """PEFT's QA-LoRA config with every nn.Linear wrapped as PEFT wraps a GPTQ layer (``GPTQLoraLinear``, whose
    branch is ``QALoraLinearVariant``): PEFT's own QA-LoRA code over a full-precision base, as gptqmodel (which needs
    a newer torch than this project's CI) is not installed."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    config = LoraConfig(use_qalora=True, **kw)
    config._register_custom_module({torch.nn.Linear: GPTQLoraLinear})
    return config


def test_qalora_equals_peft_and_merges_where_peft_cannot(tmp_path):
    """QA-LoRA: PEFT's draws (A replaced by an [r, in/g] layer), pooled-input outputs and gradients, checkpoints both
    ways; lora_fx also merges it (ΔW repeats each of A's columns over its group) and names a file whose A is not
    pooled."""
    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], qalora_group_size=8)
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(model), qalora_config(**kw))
    torch.manual_seed(5)
    lm = lora_fx.lorafy(copy.deepcopy(model), LoraConfig(use_qalora=True, **kw), example_inputs=(ids,))
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert type(layer).__name__ == "GPTQLoraLinear" and unit.lora_A.shape[1] == layer.in_features // 8
        assert torch.equal(unit.lora_A, layer.lora_A["default"].weight), key
        assert torch.equal(unit.lora_B, layer.lora_B["default"].weight), key
    _nonzero_b(pm, lm)
    _same_loss_and_grads(pm, lm, ids, ("lora_A", "lora_B"))
    pm.eval(), lm.eval()
    with torch.no_grad():
        want = pm(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-6
        assert rel_err(lm(ids).logits, model(ids).logits) > 1e-4
        lm.merge()
        assert rel_err(lm(ids).logits, want) < 1e-5
        lm.unmerge()
        assert rel_err(lm(ids).logits, want) < 1e-6
    pm.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(ids,)).eval()
    loaded.save_pretrained(tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine", config=qalora_config(**kw)).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, want) < 1e-6
        assert rel_err(back(ids).logits, want) < 1e-6
    assert loaded.peft_config["default"].qalora_group_size == 8
    plain = get_peft_model(copy.deepcopy(model), LoraConfig(use_qalora=True, **kw))  # PEFT: plain LoRA on nn.Linear
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(lora_fx.CheckpointError, match="set use_qalora to false"):
        lora_fx.from_peft(copy.deepcopy(model), tmp_path / "plain", example_inputs=(ids,))
    with pytest.raises(lora_fx.RuleError, match="not divisible by qalora_group_size=5"):
        lora_fx.lorafy(copy.deepcopy(model), Rule("q_proj", qalora=5), example_inputs=(ids,))
    with pytest.raises(lora_fx.RuleError, match="QA-LoRA pools"):
        Rule("q_proj", qalora=8, use_dora=True)
