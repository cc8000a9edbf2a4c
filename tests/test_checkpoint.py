"""PEFT's adapter format both ways, native lossless state_dict, atomic writes, bad checkpoints."""

import json

import pytest
import torch
from helpers import rel_err, run
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from zoo import ZOO

import lora_fx
from lora_fx import CheckpointError, Rule, RuleError
from lora_fx.peft.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _peft_saved(case, tmp_path, **cfg):
    """A PEFT model with random nonzero adapters, saved by PEFT to tmp_path."""
    cfg.setdefault("target_modules", case.targets)
    cfg.setdefault("fan_in_fan_out", case.fan_in_fan_out)
    torch.manual_seed(3)
    pm = get_peft_model(case.build(), LoraConfig(init_lora_weights=False, **cfg)).eval()
    pm.save_pretrained(tmp_path)
    return pm


def test_peft_saved_adapter_loads_and_matches(peft_case, tmp_path):
    pm = _peft_saved(peft_case, tmp_path, r=4, lora_alpha=8)
    lm = lora_fx.from_peft(peft_case.build(), tmp_path, **peft_case.lorafy_kwargs())
    assert rel_err(run(lm, peft_case), run(pm, peft_case)) < 1e-6


@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"k_proj": 3}),
    dict(r=2, lora_alpha=4, target_modules=r".*layers\.0\.(self_attn|mlp)\.(q|up)_proj"),
    dict(r=8, lora_alpha=2, use_rslora=True, exclude_modules=["layers.0.self_attn.q_proj"]),
])
def test_peft_configs_load_and_match(cfg, tmp_path):
    c = ZOO["llama"]
    pm = _peft_saved(c, tmp_path, **cfg)
    lm = lora_fx.from_peft(c.build(), tmp_path, **c.lorafy_kwargs())
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6


def test_our_adapter_loads_in_peft(peft_case, tmp_path):
    c = peft_case
    lm = lora_fx.lorafy(c.build(), [Rule("re:.*1\\..*", r=2, alpha=3, init=False), Rule(c.targets, r=4, init=False)],
                        **c.lorafy_kwargs())
    lm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == sorted(r["key"] for r in lm.report().rows)
    pm = PeftModel.from_pretrained(c.build(), tmp_path).eval()
    assert rel_err(run(pm, c), run(lm, c)) < 1e-6
    names = set(load_file(tmp_path / WEIGHTS_NAME))
    suffixes = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
    assert all(n.startswith("base_model.model.") and n.endswith(suffixes) for n in names)


def test_two_adapters_round_trip(tmp_path):
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(["fc1", "fc2"], r=2, init=False))
    lm.add_adapter("other", Rule(["head"], r=3, alpha=6, init=False))
    lm.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "other" / WEIGHTS_NAME).is_file()
    lm2 = lora_fx.from_peft(c.build(), tmp_path)
    lm2.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        lm.set_adapter(name)
        lm2.set_adapter(name)
        assert torch.equal(run(lm, c), run(lm2, c))
    pm = PeftModel.from_pretrained(c.build(), tmp_path)
    pm.load_adapter(tmp_path / "other", adapter_name="other")
    pm.set_adapter("other")
    assert rel_err(run(pm.eval(), c), run(lm2, c)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_native_state_dict_round_trip_is_bitwise(dtype):
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build().to(dtype), Rule(c.targets, init=False), autocast_adapter_dtype=False)
    sd = {k: v.clone() for k, v in lm.adapters.state_dict().items()}
    lm2 = lora_fx.lorafy(c.build().to(dtype), Rule(c.targets), autocast_adapter_dtype=False)
    lm2.adapters.load_state_dict(sd)
    assert all(torch.equal(v, lm2.adapters.state_dict()[k]) and v.dtype == dtype for k, v in sd.items())


def test_safetensors_round_trip_is_bitwise_in_bf16(tmp_path):
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build().to(torch.bfloat16), Rule(c.targets, init=False), autocast_adapter_dtype=False)
    lm.save_pretrained(tmp_path)
    lm2 = lora_fx.from_peft(c.build().to(torch.bfloat16), tmp_path)
    for key, unit in lm.adapters.units("default").items():
        other = lm2.adapters.unit("default", key)
        assert torch.equal(unit.lora_A, other.lora_A.to(unit.lora_A.dtype))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False))
    lm.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("lora_fx.peft.checkpoint.save_file", crash)
    with torch.no_grad():
        lm.unit("fc1").lora_A.add_(1)
    with pytest.raises(KeyboardInterrupt):
        lm.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


# ---- bad checkpoints: a clear error naming the file / key, and the model unchanged -----------------------

@pytest.fixture
def saved_mlp(tmp_path):
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, init=False))
    lm.save_pretrained(tmp_path)
    return tmp_path


def _target():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(["fc1"], init=False))
    return lm, lm.code, lm.adapters.names


def _edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


def _expect_unchanged_after(error, fragment, path, **kwargs):
    lm, code, names = _target()
    with pytest.raises(error) as e:
        lm.load_adapter(path, "extra", **kwargs)
    assert fragment in str(e.value)
    assert lm.code == code and lm.adapters.names == names and lm.active_adapters == ["default"]
    return str(e.value)


def test_missing_directory_or_files(tmp_path):
    _expect_unchanged_after(CheckpointError, CONFIG_NAME, tmp_path / "nowhere")
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["fc1"]}))
    _expect_unchanged_after(CheckpointError, WEIGHTS_NAME, tmp_path)


def test_config_naming_modules_the_model_lacks(saved_mlp):
    cfg = json.loads((saved_mlp / CONFIG_NAME).read_text())
    cfg["target_modules"] = ["q_proj"]
    (saved_mlp / CONFIG_NAME).write_text(json.dumps(cfg))
    _expect_unchanged_after(RuleError, "q_proj", saved_mlp)


def test_missing_tensor(saved_mlp):
    _edit_tensors(saved_mlp, lambda t: t.pop("base_model.model.fc2.lora_B.weight"))
    _expect_unchanged_after(CheckpointError, "base_model.model.fc2.lora_B.weight", saved_mlp)


def test_unexpected_tensor(saved_mlp):
    _edit_tensors(saved_mlp, lambda t: t.update({"base_model.model.other.lora_A.weight": torch.zeros(2, 2)}))
    _expect_unchanged_after(CheckpointError, "base_model.model.other.lora_A.weight", saved_mlp)


def test_shape_mismatch(saved_mlp):
    _edit_tensors(saved_mlp, lambda t: t.update({"base_model.model.fc1.lora_A.weight": torch.zeros(4, 13)}))
    msg = _expect_unchanged_after(CheckpointError, "base_model.model.fc1.lora_A.weight", saved_mlp)
    assert "(4, 13)" in msg and "(4, 12)" in msg


def test_corrupted_files(saved_mlp):
    (saved_mlp / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    _expect_unchanged_after(CheckpointError, WEIGHTS_NAME, saved_mlp)
    (saved_mlp / CONFIG_NAME).write_text("{not json")
    _expect_unchanged_after(CheckpointError, CONFIG_NAME, saved_mlp)


def test_pickle_refused_unless_opted_in(saved_mlp):
    tensors = load_file(saved_mlp / WEIGHTS_NAME)
    (saved_mlp / WEIGHTS_NAME).unlink()
    torch.save(tensors, saved_mlp / "adapter_model.bin")
    _expect_unchanged_after(CheckpointError, "allow_pickle=True", saved_mlp)
    lm, _, _ = _target()
    lm.load_adapter(saved_mlp, "extra", allow_pickle=True)
    assert torch.equal(lm.adapters.unit("extra", "fc1").lora_A, tensors["base_model.model.fc1.lora_A.weight"])
