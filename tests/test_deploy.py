"""Deployment: lora_fx.compile on merged graphs, .pt2 export that loads without lora_fx, the merge CLI."""

import subprocess
import sys

import pytest
import torch
from helpers import rel_err, run
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import CheckpointError, Rule
from lora_fx.cli import main
from lora_fx.deploy.merge_dir import merge_model_dir


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_compiled_merged_graph_matches(name):
    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), **c.lorafy_kwargs())
    before = run(lm, c)
    gm = lm.merge_and_unload()
    compiled = lora_fx.compile(gm)
    assert rel_err(run(compiled, c), before) < 1e-5
    other = c.other_inputs_fn()
    assert rel_err(run(compiled, c, other), run(gm, c, other)) < 1e-5


_LOAD = """
import sys
sys.modules["lora_fx"] = None  # the program must run without lora_fx
import torch
{imports}
program = torch.export.load(sys.argv[1]).module()
inputs, expected = torch.load(sys.argv[2])
out = program(*inputs)
out = out if isinstance(out, torch.Tensor) else out[0]
err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
print("ERR", err)
"""


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_exported_pt2_reloads_without_lora_fx(name, tmp_path):
    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), **c.lorafy_kwargs())
    gm = lm.merge_and_unload()
    other = c.other_inputs_fn()  # a shape other than the example's: the program has dynamic dims
    lora_fx.export(gm, tmp_path / "model.pt2", example_inputs=c.inputs())
    torch.save((other, run(gm, c, other)), tmp_path / "io.pt")
    imports = "import transformers.modeling_outputs  # a Hugging Face model returns a ModelOutput" if c.export else ""
    proc = subprocess.run([sys.executable, "-c", _LOAD.format(imports=imports), str(tmp_path / "model.pt2"),
                           str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split("ERR")[1]) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["io.pt", "model.pt2"]  # no temp file left


@pytest.fixture
def llama_dirs(tmp_path):
    """A tiny saved Llama directory and a PEFT adapter for it with random nonzero weights."""
    from peft import LoraConfig, get_peft_model

    c = ZOO["llama"]
    c.build().save_pretrained(tmp_path / "base")
    pm = get_peft_model(c.build(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = output_tensor(pm.eval()(*c.inputs()))
    return tmp_path, expected


def test_merge_cli_round_trip(llama_dirs, capsys):
    from transformers import AutoModelForCausalLM

    root, expected = llama_dirs
    out = root / "merged"
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "merged" in printed
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(run(merged, ZOO["llama"]), expected) < 1e-5
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
                 "--no-progress"]) == 2  # a non-empty --out is refused
    assert "--force" in capsys.readouterr().err
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
                 "--no-progress", "--force"]) == 0


def test_merge_dir_rejects_adapter_for_another_model(llama_dirs):
    root, _ = llama_dirs
    gpt2 = ZOO["gpt2"].build()
    gpt2.save_pretrained(root / "gpt2")
    with pytest.raises(lora_fx.RuleError, match="q_proj"):
        merge_model_dir(root / "gpt2", root / "adapter", root / "out", progress=False)
    assert not (root / "out").exists() and not any(p.name.startswith(".out") for p in root.iterdir())
    with pytest.raises(CheckpointError, match="config.json"):
        merge_model_dir(root / "adapter", root / "adapter", root / "out", progress=False)
