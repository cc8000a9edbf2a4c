"""The on-disk capture cache (capture/disk): a second capture of the same model and call reads the stored program
instead of exporting, across processes too; anything the graph depends on changes the key; a stored program that
no longer reproduces the model, or cannot be read, is dropped and captured afresh; the folder stays under its cap."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx.capture import disk, exporting, templated
from lora_fx.cli import main as cli_main


def _llama(**overrides):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORA_FX_CAPTURE_CACHE", raising=False)
    return tmp_path / "captures"


@pytest.fixture
def exports(monkeypatch):
    """Counts torch.export runs of lora_fx's captures."""
    calls = []
    original = exporting.export_program

    def counted(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return original(*args, **kwargs)

    monkeypatch.setattr(templated, "export_program", counted)
    monkeypatch.setattr("lora_fx.capture.core.export_program", counted)
    return calls


def _lorafy(model):
    return lora_fx.lorafy(model, ["q_proj", "v_proj"], example_inputs=(IDS,))


def _entries(cache):
    return sorted(cache.glob("*.capture")) if cache.is_dir() else []


def test_second_capture_reads_the_stored_program(cache, exports):
    first = _lorafy(_llama())
    assert exports == ["LlamaForCausalLM"] and len(_entries(cache)) == 1
    model = _llama()
    expected = model(IDS).logits
    second = _lorafy(model)
    assert exports == ["LlamaForCausalLM"]  # no second export
    torch.testing.assert_close(second(IDS).logits, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first(IDS).logits, expected, rtol=1e-6, atol=1e-6)
    assert second.graph_module.get_parameter("model.layers.0.self_attn.q_proj.weight") is \
        model.model.layers[0].self_attn.q_proj.weight  # the model's own parameters, not stored copies
    # a new argument combination is a capture of its own, cached too
    second(IDS, labels=IDS)
    _lorafy(_llama())(IDS, labels=IDS)
    assert exports == ["LlamaForCausalLM"] * 2


def test_hits_across_processes(cache, tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        import lora_fx
        from lora_fx.capture import templated
        if sys.argv[1] == "forbid":
            def refuse(*a, **k):
                raise AssertionError("exported again")
            templated.export_program = refuse
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
        ids = torch.arange(16).reshape(2, 8)
        lm = lora_fx.lorafy(model, ["q_proj"], example_inputs=(ids,))
        print(float(lm(ids).logits.double().sum()))
    """)
    path = tmp_path / "capture_once.py"
    path.write_text(script)
    env = {**os.environ, "LORA_FX_CACHE_DIR": str(tmp_path)}
    outs = [subprocess.run([sys.executable, str(path), mode], env=env, capture_output=True, text=True, timeout=300)
            for mode in ("store", "forbid")]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    assert float(outs[0].stdout.split()[-1]) == float(outs[1].stdout.split()[-1])
    assert len(_entries(cache)) == 1


@pytest.mark.parametrize("change", ["config", "shapes", "mode", "call", "hook"])
def test_what_the_graph_depends_on_changes_the_key(cache, exports, change):
    _lorafy(_llama())
    model = _llama(rms_norm_eps=1e-3) if change == "config" else _llama(intermediate_size=48) \
        if change == "shapes" else _llama()
    if change == "mode":
        model.train()
    if change == "hook":
        model.model.layers[0].register_forward_hook(lambda m, a, out: out)
    if change == "call":
        lora_fx.lorafy(model, ["q_proj"], example_inputs=(IDS,), example_kwargs={"attention_mask":
                                                                                    torch.ones_like(IDS)})
    else:
        _lorafy(model)
    assert len(exports) == 2
    assert len(_entries(cache)) == (1 if change == "hook" else 2)


def test_a_stored_program_that_no_longer_reproduces_is_dropped(cache, exports, monkeypatch):
    key = disk._key
    monkeypatch.setattr(disk, "_key", lambda model, *a: {**key(model, *a), "config": None, "modules": None})
    _lorafy(_llama())
    model = _llama(rms_norm_eps=0.5)  # same graph shape, another constant baked into it
    lm = _lorafy(model)
    assert len(exports) == 2  # the stored program was loaded, failed the check, and was replaced
    torch.testing.assert_close(lm(IDS).logits, model(IDS).logits, rtol=1e-6, atol=1e-6)
    assert len(_entries(cache)) == 1


def test_an_unreadable_entry_is_a_miss(cache, exports):
    _lorafy(_llama())
    (entry,) = _entries(cache)
    entry.write_bytes(b"not a pickle")
    model = _llama()
    lm = _lorafy(model)
    assert len(exports) == 2
    torch.testing.assert_close(lm(IDS).logits, model(IDS).logits, rtol=1e-6, atol=1e-6)
    assert _entries(cache) == [entry] and entry.stat().st_size > 1000  # stored afresh


def test_whole_model_captures_are_cached(cache, exports):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    x = torch.randn(3, 8)
    lora_fx.lorafy(Net(), "fc1", example_inputs=(x,))
    net = Net()
    lm = lora_fx.lorafy(net, "fc1", example_inputs=(x,))
    assert exports == ["Net"]
    torch.testing.assert_close(lm(x), net(x))


def test_cap_evicts_least_recently_used(cache, exports, monkeypatch):
    _lorafy(_llama())
    (first,) = _entries(cache)
    monkeypatch.setenv("LORA_FX_CAPTURE_CACHE_MB", str(first.stat().st_size * 1.5 / 2**20))
    _lorafy(_llama(num_hidden_layers=3))
    (kept,) = _entries(cache)
    assert kept != first


def test_off_and_clear(cache, exports, monkeypatch, capsys):
    monkeypatch.setenv("LORA_FX_CAPTURE_CACHE", "0")
    _lorafy(_llama())
    assert _entries(cache) == []
    monkeypatch.setenv("LORA_FX_CAPTURE_CACHE", "1")
    _lorafy(_llama())
    assert len(_entries(cache)) == 1
    assert cli_main(["cache", "info"]) == 0
    assert str(cache) in capsys.readouterr().out
    assert cli_main(["cache", "clear"]) == 0
    assert "removed 1" in capsys.readouterr().out and _entries(cache) == []
    monkeypatch.setenv("LORA_FX_CAPTURE_CACHE_MB", "lots")
    assert cli_main(["cache", "info"]) == 2
    assert "LORA_FX_CAPTURE_CACHE_MB='lots'" in capsys.readouterr().err


def test_generation_graphs_are_cached_with_their_shared_kv_cache(cache, exports):
    """The prefill and decode programs share the step's KV cache: read back, they must write and read the same
    cache tensors (a stored constant that was one of the step's buffers is that buffer again)."""
    first = _lorafy(_llama())
    want = first.eval().generate(IDS, max_new_tokens=12)
    count = len(exports)
    second = _lorafy(_llama()).eval()
    assert torch.equal(second.generate(IDS, max_new_tokens=12), want)
    assert len(exports) == count  # every capture, the generation steps' included, read from the cache
