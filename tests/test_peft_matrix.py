"""PEFT's custom-model test matrix run both ways: a PEFT adapter loaded with ``from_peft`` gives PEFT's outputs,
and what lora_fx saves loads in PEFT (``PeftModel.from_pretrained``) with lora_fx's outputs."""

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from peft_style import STYLES

import lora_fx


def call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits_per_image"):
        return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten()])
    return out.logits if hasattr(out, "logits") else out[0]


def capture_kwargs(inputs) -> dict:
    return {"example_kwargs": inputs} if isinstance(inputs, dict) else {"example_inputs": inputs}


def randomize(lm: lora_fx.LoraModel) -> None:
    """Non-zero B (and DoRA magnitudes moved off the weight norms) so a wrong delta shows in the outputs."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora" in name or "magnitude" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def peft_to_lora_fx(style, config, tmp_path):
    inputs = style.inputs()
    pm = get_peft_model(style.build(), config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():  # a MultiheadAttention's out_proj LoRA stays zero (see test_mha_*)
            if "lora_B" in name and "base_layer.out_proj" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        want = call(pm, inputs)
    pm.save_pretrained(tmp_path)
    lm = lora_fx.from_peft(style.build(), tmp_path, **capture_kwargs(inputs)).eval()
    with torch.no_grad():
        return call(lm, inputs), want


def lora_fx_to_peft(style, config, tmp_path):
    inputs = style.inputs()
    lm = lora_fx.lorafy(style.build(), config, **capture_kwargs(inputs))
    randomize(lm.eval())
    with torch.no_grad():
        want = call(lm, inputs)
    lm.save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(style.build(), tmp_path).eval()
    with torch.no_grad():
        return call(pm, inputs), want


MATRIX = [
    ("mlp", dict(target_modules=["lin0"])),
    ("mlp", dict(target_modules=["lin0", "lin1"], r=16, lora_alpha=4, use_rslora=True)),
    ("mlp", dict(target_modules=["lin0"], lora_dropout=0.1, bias="all")),
    ("mlp", dict(target_modules=["lin0"], use_dora=True)),
    ("emb_conv1d", dict(target_modules=["emb", "conv1d"])),
    ("emb_conv1d", dict(target_modules=["emb", "conv1d"], use_dora=True)),
    ("emb_conv1d", dict(target_modules=["conv1d"], r=8, rank_pattern={"conv1d": 3})),
    ("grouped_conv", dict(target_modules=["conv2d", "depthwise"], r=16)),
    ("grouped_conv", dict(target_modules=["conv2d"], r=8, use_dora=True)),
    ("grouped_conv", dict(target_modules=["conv2d", "lin0"], r=8, lora_alpha=32)),
    ("clip", dict(target_modules=["q_proj", "v_proj", "fc1"], r=4)),
    ("mha_unbatched", dict(target_modules=["mha", "lin0"])),
    ("mha_cross", dict(target_modules=["mha"], r=4)),
    ("mha_self", dict(target_modules=["mha", "lin0"], r=4, lora_alpha=16)),
]
IDS = [f"{style}-{'-'.join(f'{k}' for k in kw if k != 'target_modules') or 'plain'}" for style, kw in MATRIX]


@pytest.mark.parametrize(("style", "kw"), MATRIX, ids=IDS)
def test_peft_checkpoint_loads_with_peft_outputs(style, kw, tmp_path):
    got, want = peft_to_lora_fx(STYLES[style], LoraConfig(**kw), tmp_path)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize(("style", "kw"), MATRIX, ids=IDS)
def test_lora_fx_checkpoint_loads_in_peft(style, kw, tmp_path):
    got, want = lora_fx_to_peft(STYLES[style], LoraConfig(**kw), tmp_path)
    assert rel_err(got, want) < 1e-5


def test_grouped_conv_merge_is_refused_and_changes_nothing():
    style = STYLES["grouped_conv"]
    x = style.inputs()
    lm = lora_fx.lorafy(style.build(), lora_fx.Rule(["conv2d", "lin0"], r=8, init=False), example_inputs=x).eval()
    with torch.no_grad():
        want = lm(*x)
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(lora_fx.MergeError, match="'conv2d' cannot be merged.*groups=8"):
        lm.merge_adapter()
    with pytest.raises(lora_fx.MergeError, match="groups=8"):
        lm.merge_and_unload()
    assert all(torch.equal(v, weights[k]) for k, v in lm.state_dict().items())
    with torch.no_grad():
        assert torch.equal(lm(*x), want)


def test_grouped_conv_rank_must_divide_by_groups():
    style = STYLES["grouped_conv"]
    with pytest.raises(lora_fx.RuleError, match="groups"):
        lora_fx.lorafy(style.build(), lora_fx.Rule(["conv2d"], r=4), example_inputs=style.inputs())


@pytest.mark.parametrize("style", ["mha_unbatched", "mha_cross", "mha_self"])
def test_mha_forms_merge_and_unmerge_exactly(style):
    s = STYLES[style]
    x = s.inputs()
    lm = lora_fx.lorafy(s.build(), lora_fx.Rule(["mha"], r=4, init=False), example_inputs=x).eval()
    assert lm.report().rows[0]["key"] == "mha"
    weight = lm.graph_module.get_parameter("mha.in_proj_weight").detach().clone()
    with torch.no_grad():
        want = lm(*x)
        lm.merge()
        assert rel_err(lm(*x), want) < 1e-5
        lm.unmerge()
        assert torch.equal(lm(*x), want)
    assert torch.equal(lm.graph_module.get_parameter("mha.in_proj_weight"), weight)


def test_mha_with_other_key_and_value_sizes_names_its_weights():
    s = STYLES["mha_kdim"]
    x = s.inputs()
    with pytest.raises(lora_fx.RuleError, match="'mha'.*'mha.k_proj_weight'.*'mha.q_proj_weight'"):
        lora_fx.lorafy(s.build(), ["mha", "lin0"], example_inputs=x)
    model = s.build()
    lm = lora_fx.lorafy(model, lora_fx.Rule(["q_proj_weight", "v_proj_weight"], r=2, init=False),
                        example_inputs=x).eval()
    ref = s.build()
    with torch.no_grad():
        for name in ("q_proj_weight", "v_proj_weight"):
            getattr(ref.mha, name).add_(lm.unit(f"mha.{name}").delta_weight())
        assert rel_err(lm(*x), ref(*x)) < 1e-5


def test_mha_needs_export_and_plain_lora():
    s = STYLES["mha_unbatched"]
    with pytest.raises(lora_fx.RuleError, match="'mha'.*example_inputs"):
        lora_fx.lorafy(s.build(), ["mha", "lin0"])  # symbolic_trace keeps the attention whole
    with pytest.raises(lora_fx.RuleError, match="DoRA on 'mha'.*rows"):
        lora_fx.lorafy(s.build(), lora_fx.Rule(["mha"], use_dora=True), example_inputs=s.inputs())
