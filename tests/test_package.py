"""AOTInductor packages (five builds of ~15 s: an unmerged LoraModel, shared module-wide; a merged one by the
command line; a routed one; two of lm.generate's graph, one-adapter and routed): run in a fresh process that never
imports lora_fx, adapters swapped into a loaded package without compiling, and a killed packaging that leaves no
file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from zoo import ZOO

import lora_fx
from lora_fx import AdapterError, CheckpointError, Rule

TARGETS = ["q_proj", "v_proj"]


def _lm(seed: int = 0, r: int = 4, alpha: float = 8):
    c = ZOO["llama"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return lora_fx.lorafy(c.build(), Rule(TARGETS, r=r, alpha=alpha, init=False), **c.lorafy_kwargs()).eval()


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """One unmerged package (the merged form is built by the command-line test)."""
    root = tmp_path_factory.mktemp("packages")
    lm = _lm()
    lora_fx.package(lm, root / "unmerged.pt2", example_inputs=(ZOO["llama"].inputs()[0],))
    return root, lm


def _fresh_process(path, ids: torch.Tensor) -> torch.Tensor:
    """Run the package in a new interpreter that must not import lora_fx; returns its logits."""
    torch.save(ids, path.parent / "ids.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.modules["lora_fx"] = None  # any import of lora_fx fails
        import transformers.modeling_outputs  # the output class the program returns (a pytree node)
        loaded = torch._inductor.aoti_load_package({str(path)!r})
        out = loaded(torch.load({str(path.parent / 'ids.pt')!r}))
        torch.save(out.logits, {str(path.parent / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return torch.load(path.parent / "out.pt")


def test_an_unmerged_package_runs_without_lora_fx_with_dynamic_shapes(packages):
    root, lm = packages
    other = ZOO["llama"].other_inputs_fn()[0]  # another batch size and length: dynamic dimensions
    with torch.no_grad():
        want = lm(other).logits
    assert torch.allclose(_fresh_process(root / "unmerged.pt2", other), want, rtol=1e-5, atol=1e-5)


def test_adapters_swap_into_a_loaded_package_without_compiling(packages, tmp_path):
    root, lm = packages
    ids = ZOO["llama"].inputs()[0]
    loaded = torch._inductor.aoti_load_package(str(root / "unmerged.pt2"))
    manifest = lora_fx.deploy.read_manifest(root / "unmerged.pt2")
    assert {u["key"].rpartition(".")[2] for u in manifest["units"]} == set(TARGETS)
    for seed, r, alpha in [(1, 4, 8), (2, 2, 16), (3, 4, 3)]:  # another rank (padded) and alpha (rescaled)
        other = _lm(seed, r, alpha)
        other.save_pretrained(tmp_path / str(seed))
        lora_fx.swap_adapter(loaded, root / "unmerged.pt2", tmp_path / str(seed))
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, other(ids).logits, rtol=1e-5, atol=1e-5)
    lm.save_pretrained(tmp_path / "back")
    lora_fx.swap_adapter(loaded, root / "unmerged.pt2", tmp_path / "back")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)


def test_swaps_that_do_not_fit_are_refused_before_anything_changes(packages, tmp_path):
    root, lm = packages
    loaded = torch._inductor.aoti_load_package(str(root / "unmerged.pt2"))
    _lm(1, r=8, alpha=8).save_pretrained(tmp_path / "big")
    with pytest.raises(CheckpointError, match="rank at most 4"):
        lora_fx.swap_adapter(loaded, root / "unmerged.pt2", tmp_path / "big")
    c = ZOO["llama"]
    wide = lora_fx.lorafy(c.build(), Rule(["q_proj", "o_proj"], r=4), **c.lorafy_kwargs())
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match="no place in"):
        lora_fx.swap_adapter(loaded, root / "unmerged.pt2", tmp_path / "wide")
    ids = c.inputs()[0]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_killed_packaging_leaves_no_file(tmp_path, monkeypatch):
    def killed(program, package_path):
        with open(package_path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", killed)
    with pytest.raises(KeyboardInterrupt):
        lora_fx.package(_lm(), tmp_path / "m.pt2", example_inputs=(ZOO["llama"].inputs()[0],))
    assert list(tmp_path.iterdir()) == []
    lm = _lm()
    lm.add_adapter("b", Rule(TARGETS, r=2))
    lm.set_adapter(["default", "b"])
    with pytest.raises(AdapterError, match="set_adapter\\(one\\)"):
        lora_fx.package(lm, tmp_path / "two.pt2", example_inputs=(ZOO["llama"].inputs()[0],))
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_packages_a_model_directory(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_fx.cli import main

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    lm = lora_fx.lorafy(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), Rule(["q_proj"], r=2, init=False),
                        example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
    lm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "model.pt2"
    args = ["package", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "capture" in err and "merge" in err and "compile and write" in err
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = lm(ids).logits
    assert torch.allclose(_fresh_process(out, ids), want, atol=1e-5)  # merged, run without lora_fx
    with pytest.raises(AdapterError, match="no LoRA branches"):
        lora_fx.swap_adapter(torch._inductor.aoti_load_package(str(out)), out, tmp_path / "adapter")
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no --force: refused, the file kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".pt") == ["adapter", "base", "model.pt2"]


def test_a_routed_package_serves_an_adapter_per_row(tmp_path):
    lm = _lm()
    lm.add_adapter("b", Rule(TARGETS, r=2, alpha=4, init=False))
    lm.build_adapter_bank()
    ids = ZOO["llama"].inputs()[0]
    lora_fx.package(lm, tmp_path / "routed.pt2", example_inputs=(ids,))
    loaded = torch._inductor.aoti_load_package(str(tmp_path / "routed.pt2"))
    other = ZOO["llama"].other_inputs_fn()[0]
    names = ["b", "__base__", "default"][: len(other)]
    with torch.no_grad():
        want = lm(other, adapter_names=names).logits
        got = loaded(other, lora_route=lora_fx.deploy.route(tmp_path / "routed.pt2", names)).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="not in"):
        lora_fx.deploy.route(tmp_path / "routed.pt2", ["c"])
    with pytest.raises(AdapterError, match="routed package"):
        lora_fx.swap_adapter(loaded, tmp_path / "routed.pt2", tmp_path)


def _padded():
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_a_generation_package_gives_lm_generates_tokens_without_lora_fx(tmp_path):
    """lm.generate's graph packaged once serves any batch (greedy, left padding) in a process without lora_fx,
    through the standalone runner; another adapter swaps into it without compiling."""
    from lora_fx.generation import loop

    lm, path = _lm(), tmp_path / "gen.pt2"
    lora_fx.package_generation(lm, path, max_length=40)  # rounded up to a 64-token cache
    ids, mask = _padded()
    torch.save((ids, mask), tmp_path / "prompt.pt")
    code = textwrap.dedent(f"""
        import runpy, sys, torch
        sys.modules["lora_fx"] = None  # any import of lora_fx fails
        runner = runpy.run_path({loop.__file__!r})["PackagedGenerator"]({str(path)!r})
        ids, mask = torch.load({str(tmp_path / 'prompt.pt')!r})
        torch.save(runner.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0),
                   {str(tmp_path / 'tokens.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"),
                       lm.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0))
    gen = lora_fx.PackagedGenerator(path)
    assert gen.meta["cache_len"] == 64
    assert torch.equal(gen.generate(ids[1:2], max_new_tokens=12), lm.generate(ids[1:2], max_new_tokens=12))
    other = _lm(seed=3, r=2, alpha=6)
    with torch.no_grad():
        for _, unit in other.adapters.iter_units():
            unit.lora_B.mul_(4)
    other.save_pretrained(tmp_path / "other")
    lora_fx.swap_adapter(gen.loaded, path, tmp_path / "other")
    assert torch.equal(gen.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0),
                       other.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0))
    with pytest.raises(ValueError, match="cache of 64 tokens"):
        gen.generate(ids, max_new_tokens=60)
    with pytest.raises(AdapterError, match="max_length=500"):
        lora_fx.package_generation(lm, tmp_path / "long.pt2", max_length=500)


def test_a_routed_generation_package_generates_an_adapter_per_row(tmp_path):
    lm = _lm()
    lm.add_adapter("b", Rule(TARGETS, r=2, alpha=4, init=False))
    with torch.no_grad():
        for _, unit in lm.adapters.iter_units():
            unit.lora_B.mul_(5)
    lm.build_adapter_bank()
    lora_fx.package_generation(lm, tmp_path / "routed.pt2", max_length=64)
    gen = lora_fx.PackagedGenerator(tmp_path / "routed.pt2")
    ids, names = _padded()[0][:3], ["b", "__base__", "default"]
    got = gen.generate(ids, max_new_tokens=16, lora_route=lora_fx.deploy.route(tmp_path / "routed.pt2", names))
    assert torch.equal(got, lm.generate(ids, max_new_tokens=16, adapter_names=names))
    assert not torch.equal(got, lm.generate(ids, max_new_tokens=16, adapter_names=["default"] * 3))
    with pytest.raises(ValueError, match="lora_route"):
        gen.generate(ids, max_new_tokens=4)
