"""Coming from PEFT: the habits and files of a PEFT user work, and the traps they fall into are named."""

import json
import warnings

import pytest
import torch
from helpers import rel_err
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from zoo import ZOO

import lora_fx
from lora_fx import AdapterError, CaptureError, Rule, RuleError, RuleWarning


def test_peft_argument_names_given_to_rule_name_the_right_ones():
    with pytest.raises(RuleError, match="lora_alpha -> alpha"):
        Rule("q_proj", lora_alpha=16)
    with pytest.raises(RuleError, match="lora_dropout -> dropout.*target_modules -> match"):
        Rule("q_proj", lora_dropout=0.1, target_modules=["q_proj"])


def test_a_typo_among_rule_entries_is_warned_and_reported():
    c = ZOO["mlp"]
    with pytest.warns(RuleWarning, match="'fc_two'"):
        lm = lora_fx.lorafy(c.build(), ["fc1", "fc_two"])
    assert "'fc_two'" in str(lm.report())
    with pytest.warns(RuleWarning, match="'fc_typo'"):
        lora_fx.lorafy(c.build(), LoraConfig(target_modules=["fc1", "fc_typo"]))


def test_adapter_names_must_give_one_name_per_row():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(["fc1"], r=2))
    lm.add_adapter("b", Rule(["fc1"], r=2))
    x = c.inputs()[0]
    with pytest.raises(AdapterError, match="1 names for 4 rows"):
        lm(x, adapter_names=["b"])
    with pytest.raises(AdapterError, match="not in the adapter bank"):
        lm(x, adapter_names=["b", "b", "c", "b"])
    assert lm.adapter_bank is None


def test_a_peft_model_is_migrated_by_from_peft_and_refused_by_lorafy():
    c = ZOO["llama"]
    pm = get_peft_model(c.build(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = c.inputs()[0]
    with torch.no_grad():
        want = {}
        for name in ("b", "default"):
            pm.set_adapter(name)
            want[name] = pm(input_ids=ids).logits
    with pytest.raises(CaptureError, match="from_peft"):
        lora_fx.lorafy(pm, ["q_proj"], example_inputs=(ids,))
    lm = lora_fx.from_peft(pm, example_inputs=(ids,))
    assert lm.adapters.names == ["default", "b"] and lm.active_adapters == ["default"]
    with torch.no_grad():
        assert rel_err(lm(ids).logits, want["default"]) < 1e-6
        lm.set_adapter("b")
        assert rel_err(lm(ids).logits, want["b"]) < 1e-6


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_and_unload_serves_save_pretrained_generate_and_config(name, tmp_path):
    from transformers import AutoModelForCausalLM

    c = ZOO[name]
    targets = [*c.targets, "lm_head"] if name == "gpt2" else c.targets  # gpt2: a tied head, untied by the merge
    lm = lora_fx.lorafy(c.build(), Rule(targets, r=4, init=False), **c.lorafy_kwargs())
    ids = c.inputs()[0]
    with torch.no_grad():
        want = lm(ids).logits
    merged = lm.merge_and_unload()
    assert isinstance(merged, torch.fx.GraphModule) and merged.config.model_type == name
    merged.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-5 and rel_err(merged(ids).logits, want) < 1e-5
    out = merged.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_checkpoints_keep_task_type_and_target_modules_as_given(tmp_path):
    from transformers import AutoModelForCausalLM

    c = ZOO["llama"]
    c.build().save_pretrained(tmp_path / "base")
    ids = c.inputs()[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    lm = lora_fx.lorafy(model, config, example_inputs=(ids,))
    lm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert type(auto).__name__ == "PeftModelForCausalLM" and rel_err(auto(input_ids=ids).logits,
                                                                            lm(ids).logits) < 1e-6
    plain = lora_fx.lorafy(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(), Rule("q_proj", r=2),
                           example_inputs=(ids,))
    plain.save_pretrained(tmp_path / "rules")
    assert json.loads((tmp_path / "rules" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "rules")
    assert type(loaded).__name__ == "PeftModelForCausalLM"


def test_an_unsupported_init_is_named_by_its_own_field():
    from lora_fx.peft.config import ruleset_from_peft_config

    with pytest.raises(RuleError, match="init_lora_weights='xavier'"):
        ruleset_from_peft_config({"target_modules": ["fc1"], "init_lora_weights": "xavier", "eva_config": None})
    model = ZOO["mlp"].build()  # "eva" itself is supported: B zero until initialize_lora_eva_weights sets A
    lm = lora_fx.lorafy(model, LoraConfig(target_modules=["fc1"], init_lora_weights="eva"))
    assert not lm.unit("fc1").lora_B.any()


def test_generate_raises_no_deprecation_warning():
    c = ZOO["llama"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=2), **c.lorafy_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.generate(c.inputs()[0][:1], max_new_tokens=3)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
