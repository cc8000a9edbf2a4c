"""The main job: `lora-fx demo` trains a tiny Llama, prints the report, lowers the loss, generates what it learnt,
saves an adapter."""

import subprocess
import sys

from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from lora_fx.cli import main
from lora_fx.demo import DemoConfig, run_demo
from lora_fx.peft.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def test_demo_learns_to_count_and_saves_peft_adapter(tmp_path, capsys):
    result = run_demo(DemoConfig(steps=60, out=str(tmp_path / "adapter")), progress=False)
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "trainable params:" in out and "loss:" in out
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.1 * sum(losses[:5]) / 5
    assert result["after"][0, 4:].tolist() == list(range(9, 17))  # 5 6 7 8 -> 9 10 ... 16
    assert result["before"][0, 4:].tolist() != list(range(9, 17)) and "after training  -> 9 10 11" in out
    assert (tmp_path / "adapter" / CONFIG_NAME).is_file() and (tmp_path / "adapter" / WEIGHTS_NAME).is_file()
    cfg = DemoConfig()
    base = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden,
                                        intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                                        num_attention_heads=4, num_key_value_heads=2))
    PeftModel.from_pretrained(base, tmp_path / "adapter")  # PEFT reads what the demo wrote


def test_cli_entry_point(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    assert "adapter saved to" in capsys.readouterr().out


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "lora_fx", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout
