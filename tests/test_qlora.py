"""Quantized bases: bitsandbytes 4-bit (nf4/fp4, double quantization) and 8-bit layers, against PEFT on the same
quantized model and adapter weights; skipped cleanly when bitsandbytes is not installed."""

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_fx  # noqa: E402
from lora_fx import Rule  # noqa: E402
from lora_fx.errors import CaptureError, MergeError  # noqa: E402

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
QUANTS = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved to disk (feature sizes multiples of 32, as bitsandbytes' CPU 4-bit kernels want)."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(base_dir, quant: str):
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**QUANTS[quant]),
                                             device_map="cpu")
    for m in model.modules():  # keep bitsandbytes' eval forward off its bf16 CPU repack (another kernel)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def peft_twin(base_dir, quant, lm):
    pm = get_peft_model(load(base_dir, quant), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for key, unit in lm.adapters.units("default").items():
            layer = pm.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)
    return pm.train() if quant == "int8" else pm.eval()  # bitsandbytes' 8-bit eval path quantizes activations


@pytest.mark.parametrize("quant", list(QUANTS))
def test_quantized_base_matches_peft_and_trains(base_dir, quant):
    lm = lora_fx.lorafy(load(base_dir, quant), Rule(TARGETS, r=4, alpha=8, init=False), example_inputs=(IDS,))
    rows = lm.report().rows
    assert len(rows) == 8 and {r["op"] for r in rows} == {f"bnb {quant.split('-')[0]}"}
    lm.eval()
    ours = logits(lm)
    assert rel(ours, logits(peft_twin(base_dir, quant, lm))) < 1e-4
    assert rel(ours, logits(load(base_dir, quant))) > 1e-3
    lm.train()
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = lm(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not any(p.requires_grad for n, p in lm.graph_module.named_parameters() if "lora" not in n)


def test_init_leaves_the_quantized_model_unchanged(base_dir):
    lm = lora_fx.lorafy(load(base_dir, "nf4-double"), Rule(TARGETS, r=4), example_inputs=(IDS,))
    assert torch.equal(logits(lm.eval()), logits(load(base_dir, "nf4-double")))


def test_checkpoints_interchange_with_peft(base_dir, tmp_path):
    lm = lora_fx.lorafy(load(base_dir, "nf4-double"), Rule(TARGETS, r=4, alpha=8, init=False),
                        example_inputs=(IDS,)).eval()
    lm.save_pretrained(tmp_path / "ours")
    pm = PeftModel.from_pretrained(load(base_dir, "nf4-double"), tmp_path / "ours").eval()
    assert rel(logits(pm), logits(lm)) < 1e-4
    pm.save_pretrained(tmp_path / "peft")
    back = lora_fx.from_peft(load(base_dir, "nf4-double"), tmp_path / "peft", example_inputs=(IDS,)).eval()
    assert rel(logits(back), logits(lm)) < 1e-4


def test_merge_refuses_quantized_bases_and_merges_onto_full_precision(base_dir, tmp_path):
    from lora_fx.deploy.merge_dir import merge_model_dir

    lm = lora_fx.lorafy(load(base_dir, "nf4-double"), Rule(TARGETS, r=4, alpha=8, init=False),
                        example_inputs=(IDS,))
    before = logits(lm.eval())
    with pytest.raises(MergeError, match="lora-fx merge"):
        lm.merge_and_unload()
    assert torch.equal(logits(lm), before)  # nothing changed
    lm.save_pretrained(tmp_path / "adapter")
    merge_model_dir(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    full = lora_fx.from_peft(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter",
                             example_inputs=(IDS,)).eval()
    assert rel(logits(merged.eval()), logits(full)) < 1e-5


def test_dora_on_a_quantized_base_is_refused_and_repacked_weights_are_named(base_dir):
    with pytest.raises(lora_fx.errors.RuleError, match="quantized"):
        lora_fx.lorafy(load(base_dir, "nf4-double"), Rule(TARGETS, r=4, use_dora=True), example_inputs=(IDS,))
    model = load(base_dir, "nf4-double")
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight.quant_state.packing_format_for_cpu = True  # what an eval forward's CPU repack leaves behind
    with pytest.raises(CaptureError, match="repacked"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_fx.lorafy(model, Rule(TARGETS, r=4), example_inputs=(IDS,))


def test_qalora_on_a_quantized_base_matches_peft_and_merges_onto_full_precision(base_dir, tmp_path):
    """QA-LoRA over a 4-bit base, against PEFT's QA-LoRA layer (GPTQLoraLinear) wrapped around the same bitsandbytes
    layers; the adapter then merges onto the full-precision model."""
    import bitsandbytes as bnb
    from peft.tuners.lora.gptq import GPTQLoraLinear

    lm = lora_fx.lorafy(load(base_dir, "nf4-double"), Rule(TARGETS, r=4, alpha=8, init=False, qalora=32),
                        example_inputs=(IDS,)).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_qalora=True, qalora_group_size=32)
    config._register_custom_module({bnb.nn.Linear4bit: GPTQLoraLinear})
    pm = get_peft_model(load(base_dir, "nf4-double"), config).eval()
    with torch.no_grad():
        for key, unit in lm.adapters.units("default").items():
            layer = pm.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)
    assert rel(logits(lm), logits(pm)) < 1e-4
    lm.save_pretrained(tmp_path / "adapter")
    full = lora_fx.from_peft(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter", example_inputs=(IDS,))
    unmerged = logits(full.eval())
    assert rel(logits(full.merge_and_unload()), unmerged) < 1e-5


def test_gptq_layers_are_refused_by_name():
    """A GPTQ kernel layer (found by its package and class name, as gptqmodel's QuantLinear classes are named) is
    named with the way forward instead of silently matching nothing."""
    cls = type("TorchQuantLinear", (torch.nn.Linear,), {"__module__": "gptqmodel.nn_modules.qlinear.torch"})
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model[2].__class__ = cls
    with pytest.raises(CaptureError, match=r"2 is a GPTQ layer .*full-precision model"):
        lora_fx.lorafy(model, Rule("0", r=2), example_inputs=(torch.randn(2, 8),))
