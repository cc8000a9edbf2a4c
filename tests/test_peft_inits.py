"""PEFT 0.21's newer initialisations against PEFT: LoftQ, LoRA-GA, CorDA and EVA (quantization residuals, gradient
and covariance statistics, incremental PCA; A, B and the residual base at init, merges, checkpoints both ways)."""

import contextlib
import copy

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from zoo import ZOO

import lora_fx
from lora_fx import Rule


def _same_init_as_peft(lm, pm):
    """A, B and the residual base weight of every unit equal PEFT's layer's."""
    base = lm.get_base_model()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert rel_err(unit.lora_A, layer.lora_A["default"].weight) < 1e-4, key
        assert rel_err(unit.lora_B, layer.lora_B["default"].weight) < 1e-4, key
        assert rel_err(base.get_submodule(key).weight, layer.base_layer.weight) < 1e-5, key


@contextlib.contextmanager
def peft_loftq_on_cpu():
    """PEFT's ``loftq_init`` computes on "cuda" or "xpu" only: run PEFT's own code on this CPU by answering its
    "xpu" with "cpu" (torch tensors and bitsandbytes' Params4bit)."""
    import bitsandbytes as bnb
    import peft.utils.loftq_utils as loftq_utils

    def cpu(args, kwargs):
        return (tuple("cpu" if a == "xpu" else a for a in args),
                {k: "cpu" if v == "xpu" else v for k, v in kwargs.items()})

    tensor_to, params_to, xpu = torch.Tensor.to, bnb.nn.Params4bit.to, loftq_utils.is_xpu_available

    def to_tensor(self, *a, **k):
        a, k = cpu(a, k)
        return tensor_to(self, *a, **k)

    def to_params(self, *a, **k):
        a, k = cpu(a, k)
        return params_to(self, *a, **k)

    torch.Tensor.to, bnb.nn.Params4bit.to, loftq_utils.is_xpu_available = to_tensor, to_params, lambda: True
    try:
        yield
    finally:
        torch.Tensor.to, bnb.nn.Params4bit.to, loftq_utils.is_xpu_available = tensor_to, params_to, xpu


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 2)])
def test_loftq_equals_peft(bits, iters, tmp_path):
    """LoftQ: the same quantized base weights and A, B as PEFT's loftq_init (run on this CPU), outputs, merge, the
    config both ways; lora_fx re-derives the base from the original weights when loading."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.config import LoftQConfig

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    with peft_loftq_on_cpu():
        pm = get_peft_model(copy.deepcopy(model), config).eval()
    lm = lora_fx.lorafy(copy.deepcopy(model), config, example_inputs=(ids,)).eval()
    base = lm.get_base_model()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert rel_err(base.get_submodule(key).weight, layer.base_layer.weight) < 1e-6, key
        assert rel_err(unit.lora_A, layer.lora_A["default"].weight) < 1e-5, key
        assert rel_err(unit.lora_B, layer.lora_B["default"].weight) < 1e-5, key
    with torch.no_grad():
        want, full = pm(ids).logits, model(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-5
        assert rel_err(lm(ids).logits, full) < rel_err(lm.get_base_model()(ids).logits, full)  # A, B restore W
        lm.merge()
        assert rel_err(lm(ids).logits, want) < 1e-5
        lm.unmerge()
    lm.save_pretrained(tmp_path)
    assert lm.peft_config["default"].loftq_config == {"loftq_bits": bits, "loftq_iter": iters}
    assert lm.peft_config["default"].init_lora_weights == "loftq"
    loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path, example_inputs=(ids,)).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, want) < 1e-5
    with peft_loftq_on_cpu():
        back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-5
    with pytest.raises(lora_fx.RuleError, match="loftq"):
        lora_fx.lorafy(ZOO["gpt2"].build(), Rule("c_attn", r=2, init="loftq"), **ZOO["gpt2"].lorafy_kwargs())
    with pytest.raises(lora_fx.RuleError, match="bits in"):
        Rule("q_proj", init="loftq", loftq=(3, 1))


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("A2rBr", "gd_scale"),
                                             ("random", "unit")])
def test_lora_ga_equals_peft(direction, scale, tmp_path):
    """LoRA-GA: the same averaged gradients (PEFT's preprocess_loraga and ours, from a train_step or from batches),
    the same A, B and base residual W - s·B A at init (outputs unchanged), merge back to W; a loaded adapter keeps
    its file's tensors."""
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga as peft_preprocess

    c = ZOO["gpt2" if direction == "ArBr" else "llama"]
    model, ids = c.build(), c.inputs()[0]
    targets = ["c_attn", "c_fc"] if direction == "ArBr" else ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_gamma=4),
                        fan_in_fan_out=c.fan_in_fan_out)
    batches = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(1), "labels": ids.flip(1)}]
    theirs, mine = copy.deepcopy(model), copy.deepcopy(model)

    def train_step():
        for b in batches:
            theirs(**b).loss.backward()
    torch.manual_seed(3)  # GPT-2's dropout runs in the gradient pass: the same masks in both
    peft_preprocess(theirs, config, train_step)
    torch.manual_seed(3)
    lora_fx.preprocess_loraga(mine, config, batches)
    for name, module in mine.named_modules():
        if hasattr(module, "_peft_loraga_grad"):
            assert rel_err(module._peft_loraga_grad, theirs.get_submodule(name)._peft_loraga_grad) < 1e-5, name
    torch.manual_seed(7)
    pm = get_peft_model(theirs, config).eval()
    torch.manual_seed(7)
    lm = lora_fx.lorafy(mine, config, **c.lorafy_kwargs()).eval()
    _same_init_as_peft(lm, pm)
    with torch.no_grad():
        want = model(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-5
        assert rel_err(lm(ids).logits, pm(ids).logits) < 1e-5
        lm.merge()
        for key in lm.adapters.units("default"):
            assert rel_err(lm.get_base_model().get_submodule(key).weight, model.get_submodule(key).weight) < 1e-5, key
        lm.unmerge()
    lm.save_pretrained(tmp_path)
    assert lm.peft_config["default"].init_lora_weights == "lora_ga"
    loaded = lora_fx.from_peft(copy.deepcopy(model), tmp_path, **c.lorafy_kwargs())  # no gradients: PEFT's fallback
    for key, unit in loaded.adapters.units("default").items():
        assert torch.equal(unit.lora_A, lm.unit(key).lora_A)
        assert torch.equal(loaded.get_base_model().get_submodule(key).weight, model.get_submodule(key).weight)


@pytest.mark.parametrize("name,method", [("llama", "ipm"), ("gpt2", "kpm")])
def test_corda_equals_peft(name, method, tmp_path):
    """CorDA: the same covariance eigens as PEFT's preprocess_corda (ours from batches, PEFT's from run_model), the
    same A, B and residual base at init (outputs unchanged), merge back to W; cache files; no eigens: refused."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    c = ZOO[name]
    model, ids = c.build(), c.inputs()[0]
    rows = [ids[i:i + 1] for i in range(ids.shape[0])]  # PEFT's hook takes one sample per call
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda", rank_pattern={
        targets[0]: 2}, corda_config=CordaConfig(corda_method=method), fan_in_fan_out=c.fan_in_fan_out)
    theirs, mine = copy.deepcopy(model), copy.deepcopy(model)

    def run_model():
        for row in rows:
            theirs(row)
    peft_preprocess(theirs, config, run_model=run_model)
    lora_fx.preprocess_corda(mine, config, rows, cache_file=tmp_path / "eigens.pt")
    for module_name, module in mine.named_modules():
        if hasattr(module, "eigens"):
            assert rel_err(module.eigens.S_WC, theirs.get_submodule(module_name).eigens.S_WC) < 1e-5, module_name
    pm = get_peft_model(theirs, config).eval()
    lm = lora_fx.lorafy(mine, config, **c.lorafy_kwargs()).eval()
    _same_init_as_peft(lm, pm)
    with torch.no_grad():
        want = model(ids).logits
        assert rel_err(lm(ids).logits, want) < 1e-5
        lm.merge()
        assert rel_err(lm(ids).logits, want) < 1e-5
        lm.unmerge()
    lm.save_pretrained(tmp_path / "adapter")
    assert lm.peft_config["default"].corda_config.corda_method == method
    with pytest.raises(lora_fx.RuleError, match="preprocess_corda"):
        lora_fx.from_peft(copy.deepcopy(model), tmp_path / "adapter", **c.lorafy_kwargs())
    fresh = copy.deepcopy(model)
    lora_fx.preprocess_corda(fresh, config, cache_file=tmp_path / "eigens.pt")  # read back, no data
    loaded = lora_fx.from_peft(fresh, tmp_path / "adapter", **c.lorafy_kwargs()).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, lm(ids).logits) < 1e-5


def test_eva_equals_peft(tmp_path):
    """EVA: the same state dict as PEFT's get_eva_state_dict (incremental PCA per layer, q/k/v sharing one input,
    ranks redistributed), the adapter rebuilt with those ranks and A's (B zero: outputs unchanged), alpha adjusted;
    checkpoints load in PEFT."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict as peft_eva
    from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize

    c = ZOO["llama"]
    model, ids = c.build(), c.inputs()[0]
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": torch.randint(0, 96, (2, 16), generator=g),
                "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(6)]
    batches[0]["attention_mask"][0, :3] = 0
    def config():  # PEFT's initialize writes the new ranks into the config it was given: one each
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                          init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.7))
    pm = get_peft_model(copy.deepcopy(model), config())
    prefixed = peft_eva(pm, batches, show_progress_bar=False)  # PEFT's own flow: on the PeftModel
    theirs = {k.replace("base_model.model.", "", 1): v for k, v in prefixed.items()}
    ours = lora_fx.get_eva_state_dict(copy.deepcopy(model), batches, config())
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        if theirs[name].numel():
            assert rel_err(ours[name], theirs[name]) < 1e-4, name
    assert len({w.shape[0] for w in theirs.values()}) > 1  # the budget was redistributed
    peft_initialize(pm, eva_state_dict=prefixed, show_progress_bar=False)
    lm = lora_fx.lorafy(copy.deepcopy(model), config(), example_inputs=(ids,))
    lora_fx.initialize_lora_eva_weights(lm, batches)
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert unit.r == layer.r["default"] and unit.scaling == layer.scaling["default"], key
        assert rel_err(unit.lora_A, layer.lora_A["default"].weight) < 1e-4, key
    assert set(lm.adapters.units("default")) == {k for k, v in theirs.items() if v.shape[0]}
    with torch.no_grad():
        assert rel_err(lm(ids).logits, model(ids).logits) < 1e-6  # B is zero
        for _, unit in lm.adapters.iter_units():
            unit.lora_B.normal_(0, 0.1)
    lm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, lm.eval()(ids).logits) < 1e-6
