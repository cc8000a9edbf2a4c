"""Nothing lost, nothing half-done, every error named: crash injection into the checkpoint and merge-directory
writers, typed errors for bad configs, size checks before allocating, NaN warnings, lossy-unmerge warnings."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from zoo import ZOO

import lora_fx
from lora_fx import CheckpointError, Rule, RuleError, atomic
from lora_fx.deploy import merge_dir
from lora_fx.peft import checkpoint as ckpt


class Crash(Exception):
    pass


def _crash_at(monkeypatch, module, name, step):
    """Make the ``step``-th call of ``module.name`` raise (a kill at that point)."""
    real, calls = getattr(module, name), []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)


def _mlp(r=4, seed=0):
    torch.manual_seed(seed)
    return lora_fx.lorafy(ZOO["mlp"].build(), Rule(["fc1", "fc2"], r=r, alpha=2 * r, init=False))


@pytest.mark.parametrize("point", [("os", "replace", 1), ("os", "replace", 2), ("Path", "unlink", 1),
                                   ("save_file", None, 1)])
def test_a_killed_save_never_leaves_a_loadable_mismatched_pair(tmp_path, monkeypatch, point):
    old, new = _mlp(r=4, seed=0), _mlp(r=2, seed=1)
    old.save_pretrained(tmp_path)
    where, name, step = point
    if where == "os":
        _crash_at(monkeypatch, ckpt.os, name, step)
    elif where == "Path":
        _crash_at(monkeypatch, Path, name, step)
    else:
        _crash_at(monkeypatch, ckpt, "save_file", step)
    with pytest.raises(Crash):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    x = ZOO["mlp"].inputs()[0]
    try:
        loaded = lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)
    except CheckpointError as e:
        assert "not found" in str(e)  # no config: a loud failure, never a silent mix
    else:
        with torch.no_grad():
            assert torch.equal(loaded(x), old(x))  # still the complete old pair
    new.save_pretrained(tmp_path)  # the next save cleans up and commits
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME]
    with torch.no_grad():
        assert torch.equal(lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)(x), new(x))


def test_saving_several_adapters_checks_all_before_writing(tmp_path):
    lm = _mlp()
    with pytest.raises(lora_fx.AdapterError):
        lm.save_pretrained(tmp_path / "out", selected_adapters=["default", "nope"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="symlink to nothing"):
        lm.save_pretrained(tmp_path / "dangling")


@pytest.mark.parametrize("field,value,match", [("r", "abc", "rank must be a positive integer"),
                                               ("r", 4.9, "rank must be a positive integer"),
                                               ("lora_dropout", "x", "lora_dropout"),
                                               ("lora_alpha", True, "alpha must be a number"),
                                               ("rank_pattern", {"(": 2}, "not a valid regular expression"),
                                               ("target_modules", 5, "target_modules=5: use a list"),
                                               ("rank_pattern", [1], "rank_pattern=\\[1\\]: use a dict"),
                                               ("alpha_pattern", "x", "alpha_pattern='x': use a dict"),
                                               ("modules_to_save", "lm_head", "modules_to_save='lm_head'.*e.g."),
                                               ("use_rslora", "false", "use_rslora='false': use true or false"),
                                               ("layers_to_transform", "0", "layers_to_transform='0'")])
def test_bad_config_values_are_named(tmp_path, field, value, match):
    _mlp().save_pretrained(tmp_path)
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    config[field] = value
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps(config))
    model = ZOO["mlp"].build()
    with pytest.raises(RuleError, match=match):
        lora_fx.from_peft(model, tmp_path)
    assert all(p.requires_grad for p in model.parameters())


def test_sizes_are_checked_before_allocating(tmp_path):
    with pytest.raises(RuleError, match="r=1000000000 on 'fc1' needs A .* GiB"):
        lora_fx.lorafy(ZOO["mlp"].build(), Rule(["fc1"], r=10**9))
    with pytest.warns(lora_fx.RuleWarning, match="rank exceeds both feature sizes"):  # PEFT accepts it too
        big = lora_fx.lorafy(ZOO["mlp"].build(), Rule(["fc1"], r=64))
    assert big.unit("fc1").lora_A.shape == (64, 12)
    _mlp().save_pretrained(tmp_path)
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    config["r"] = 1_000_000_000
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape \(4, 12\) in its header, the model needs \(1000000000, 12\)"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)
    with pytest.raises(RuleError, match="alpha"):
        Rule(["fc1"], alpha=True)


def test_non_finite_adapters_warn_or_are_refused(tmp_path):
    lm = _mlp()
    with torch.no_grad():
        lm.unit("fc1").lora_B[0, 0] = float("nan")
    lm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="fc1.lora_B.weight.*NaN or Inf"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path, strict_finite=True)


def test_a_lossy_unmerge_warns():
    lm = lora_fx.lorafy(ZOO["mlp"].build().to(torch.bfloat16), Rule(["fc1"], r=2, init=False))
    lm.merge(keep_original=False)
    with pytest.warns(UserWarning, match="repeated cycles drift"):
        lm.unmerge()
    lm.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.unmerge()  # with the originals: exact, no warning


@pytest.fixture()
def model_dirs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    lm = lora_fx.lorafy(LlamaForCausalLM(cfg).eval(), Rule(["q_proj"], r=2, init=False),
                        example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
    lm.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _complete(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


@pytest.mark.parametrize("step", [1, 2])
def test_merge_dir_is_never_missing_and_leaves_no_litter(tmp_path, model_dirs, monkeypatch, step):
    base, adapter = model_dirs
    out = tmp_path / "merged"
    merge_dir.merge_model_dir(base, adapter, out, progress=False)
    marker = out / "old-run"
    marker.write_text("x")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the fallback path: two renames
    _crash_at(monkeypatch, atomic.os, "replace", step)
    with pytest.raises(Crash):
        merge_dir.merge_model_dir(base, adapter, out, force=True, progress=False)
    monkeypatch.undo()
    assert _complete(out) or any(_complete(p) for p in tmp_path.glob(".merged.old-*"))
    dead = tmp_path / ".merged.tmp-999999-abc"  # a killed run of a process that is gone
    dead.mkdir()
    merge_dir.merge_model_dir(base, adapter, out, force=True, progress=False)
    assert _complete(out) and not marker.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_merge_dir_out_values(tmp_path, model_dirs, monkeypatch):
    base, adapter = model_dirs
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    merge_dir.merge_model_dir(base, adapter, link, progress=False)
    assert link.is_symlink() and _complete(real)
    monkeypatch.chdir(tmp_path / "real")
    with pytest.raises(CheckpointError, match="current directory"):
        merge_dir.merge_model_dir(base, adapter, ".", force=True, progress=False)
    with pytest.raises(CheckpointError, match="is --base"):
        merge_dir.merge_model_dir(base, adapter, base, force=True, progress=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    merge_dir.merge_model_dir(base, adapter, afile, force=True, progress=False)
    assert _complete(afile)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".afile")]


def _corrupt_config(tmp_path, text: str) -> None:
    _mlp().save_pretrained(tmp_path)
    (tmp_path / ckpt.CONFIG_NAME).write_text(text)


def test_a_deeply_nested_config_is_named(tmp_path):
    _corrupt_config(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nests too deeply|not valid JSON"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)


def test_an_unreadable_directory_or_config_is_named(tmp_path, monkeypatch):
    _mlp().save_pretrained(tmp_path)
    real = Path.is_file

    def denied(path):
        if path.parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(CheckpointError, match=f"{tmp_path} cannot be read .*Permission denied"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)
    monkeypatch.setattr(Path, "is_file", real)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "no")))
    with pytest.raises(CheckpointError, match="adapter_config.json cannot be read"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)


def test_a_huge_tensor_in_the_header_is_refused_before_reading(tmp_path):
    """A header declaring a 2 GiB tensor the model has no place for, on a sparse file: refused from the header."""
    import struct

    _mlp().save_pretrained(tmp_path)
    weights = tmp_path / ckpt.WEIGHTS_NAME
    n = 2**29  # float32: 2 GiB
    header = json.dumps({"base_model.model.fc9.lora_A.weight": {"dtype": "F32", "shape": [n // 8, 8],
                                                                  "data_offsets": [0, 4 * n]}}).encode()
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)  # sparse: nothing written
    with pytest.raises(CheckpointError, match="larger than any weight of this model"):
        lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)


def test_float8_adapter_tensors_load(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = _mlp()
    lm.save_pretrained(tmp_path)
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(tmp_path / ckpt.WEIGHTS_NAME).items()}
    save_file(tensors, tmp_path / ckpt.WEIGHTS_NAME)
    back = lora_fx.from_peft(ZOO["mlp"].build(), tmp_path)
    assert torch.equal(back.unit("fc1").lora_A, tensors["base_model.model.fc1.lora_A.weight"].float())


def test_an_absurd_bank_rank_is_refused_before_allocating():
    lm = _mlp()
    with pytest.raises(lora_fx.AdapterError, match="max_rank=1000000000.*GiB, more than this cpu device has"):
        lm.build_adapter_bank(max_rank=10**9)
    assert lm.state.bank is None


def _three(seed: int):
    lm = _mlp(r=2, seed=seed)
    for name in ("a", "b"):
        lm.add_adapter(name, Rule(["fc1", "fc2"], r=2, init=False))
    return lm


def _outputs(path: Path) -> dict[str, torch.Tensor]:
    lm = lora_fx.from_peft(ZOO["mlp"].build(), path)
    for name in ("a", "b"):
        lm.load_adapter(path / name, name)
    x = ZOO["mlp"].inputs()[0]
    out = {}
    with torch.no_grad():
        for name in ("default", "a", "b"):
            lm.set_adapter(name)
            out[name] = lm(x)
    return out


@pytest.mark.parametrize("step", [1, 2, 4, 7])
@pytest.mark.parametrize("killed", [False, True])
def test_a_multi_adapter_save_is_one_snapshot(tmp_path, monkeypatch, step, killed):
    """A crash (rolled back) or a kill (nothing runs after it; the next load recovers) at any rename of a
    three-adapter save leaves all three adapters of the old save, or all three of the new."""
    old, new = _three(0), _three(1)
    old.save_pretrained(tmp_path)
    want_old = _outputs(tmp_path)
    real, calls = os.replace, []

    def replace(*args, **kwargs):
        calls.append(1)
        if len(calls) == step or (killed and len(calls) > step):
            raise Crash
        return real(*args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    got = _outputs(tmp_path)
    assert all(torch.equal(got[n], want_old[n]) for n in got)  # all old: the new set never half appeared
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, "b"]
    x = ZOO["mlp"].inputs()[0]
    got = _outputs(tmp_path)
    with torch.no_grad():
        new.set_adapter("b")
        assert torch.equal(got["b"], new(x))
