"""Merge as a graph fold: equal outputs, exact unmerge, bf16 precision vs PEFT, tied weights, bad merges."""

import pytest
import torch
from helpers import peft_twin, rel_err, run
from torch import nn
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import AdapterError, MergeError, Rule
from lora_fx.capture.blocks import code_of


def _lorafied(case, **rule):
    model = case.build()
    rule.setdefault("init", False)
    return model, lora_fx.lorafy(model, Rule(case.targets, **rule), **case.lorafy_kwargs())


def test_merged_equals_unmerged_and_graph_has_no_lora(case):
    model, lm = _lorafied(case)
    before = run(lm, case)
    lm.merge()
    assert "lora" not in lm.code
    assert rel_err(run(lm, case), before) < 1e-5
    assert all("merged" in row["action"] for row in lm.report().rows)


@pytest.mark.parametrize("keep_original", [True, False])
def test_merge_unmerge_restores_base_weights(case, keep_original):
    """Bitwise from the kept copy; by float32 subtraction otherwise (error relative to ‖W‖ + ‖ΔW‖)."""
    model, lm = _lorafied(case)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = run(lm, case)
    lm.merge(keep_original=keep_original)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(merged[n], base[n]) for n in base)  # write-back into the model
    lm.unmerge()
    for n, p in model.named_parameters():
        if keep_original:
            assert torch.equal(p, base[n]), n
        else:
            scale = (base[n].norm() + (merged[n] - base[n]).norm()).item()
            assert (p.detach() - base[n]).norm().item() <= 1e-6 * scale, n
    assert "lora" in lm.code
    assert rel_err(run(lm, case), before) < 1e-6


def test_bf16_merge_is_no_worse_than_peft():
    """W' = bf16(W + s·ΔW) rounded once; compared with a float64 reference of the same math."""
    c = ZOO["llama"]
    model = c.build().to(torch.bfloat16)
    lm = lora_fx.lorafy(model, Rule(c.targets, r=8, alpha=16, init=False), example_inputs=c.inputs())
    for _, unit in lm.adapters.iter_units():  # make ΔW comparable to W so rounding matters
        nn.init.normal_(unit.lora_B, std=0.05)
    pm = peft_twin(c, lm, dtype=torch.bfloat16, r=8, lora_alpha=16)
    keys = [k for k, _ in lm.adapters.units("default").items()]
    ref64 = {}
    for key in keys:
        w = model.get_submodule(key).weight.detach().double()
        u = lm.unit(key)
        ref64[key] = w + u.scaling * u.lora_B.double() @ u.lora_A.double()
    lm.merge()
    pm.merge_adapter()
    ours = sum((model.get_submodule(k).weight.double() - ref64[k]).abs().sum().item() for k in keys)
    theirs = sum((pm.base_model.model.get_submodule(k).base_layer.weight.double() - ref64[k]).abs().sum().item()
                 for k in keys)
    assert ours <= theirs


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    c = ZOO["mlp"]
    model, lm = _lorafied(c)
    with torch.no_grad():
        lm.unit("fc2").lora_B[0, 0] = float("inf")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    code = lm.code
    with pytest.raises(MergeError, match="'fc2'"):
        lm.merge(safe=True)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert lm.code == code and lm.merged_adapters == []


def test_merge_state_errors():
    c = ZOO["mlp"]
    _, lm = _lorafied(c)
    with pytest.raises(MergeError, match="Nothing is merged"):
        lm.unmerge()
    lm.merge()
    with pytest.raises(MergeError, match="already merged"):
        lm.merge()
    lm.add_adapter("b", Rule(["fc1"]))
    with pytest.raises(MergeError, match="unmerge"):
        lm.set_adapter("b")
    with pytest.raises(MergeError, match="unmerge"):
        lm.delete_adapter("default")


def test_tied_embedding_merge_keeps_lm_head():
    c = ZOO["gpt2"]
    model = c.build()
    x = c.inputs()
    lm = lora_fx.lorafy(model, Rule(["wte", "c_attn"], init=False), example_inputs=x)
    before = run(lm, c)
    head = model.lm_head.weight.detach().clone()
    lm.merge()
    assert torch.equal(model.lm_head.weight, head)  # the untargeted use keeps W
    assert model.transformer.wte.weight is not model.lm_head.weight  # targeted use got its own merged copy
    assert rel_err(run(lm, c), before) < 1e-5
    assert "untied copy" in lm.report().rows[0]["action"]
    with torch.no_grad():  # write-back: the original model computes the merged function too
        assert rel_err(output_tensor(model(*x)), before) < 1e-5
    lm.unmerge()
    assert model.transformer.wte.weight is model.lm_head.weight
    assert torch.equal(run(lm, c), before)


def test_merge_and_unload_gives_plain_graph(case):
    _, lm = _lorafied(case)
    before = run(lm, case)
    gm = lm.merge_and_unload()
    assert isinstance(gm, torch.fx.GraphModule)
    assert "lora" not in code_of(gm) and not hasattr(gm, "lora")
    assert not any("lora" in n for n, _ in gm.named_parameters())
    assert rel_err(run(gm, case), before) < 1e-5
    with pytest.raises(AdapterError, match="unloaded"):
        lm.merge()


def test_unload_gives_base_graph(case):
    model, lm = _lorafied(case)
    base_out = run(case.build(), case)
    lm.merge()
    gm = lm.unload()
    assert "lora" not in code_of(gm) and torch.equal(run(gm, case), base_out)


def test_merged_hf_model_generates_with_merged_weights():
    c = ZOO["llama"]
    model, lm = _lorafied(c)
    ids = c.inputs()[0][:1]
    logits = output_tensor(lm(ids)).detach()
    lm.merge()
    with torch.no_grad():
        assert rel_err(model(ids).logits, logits) < 1e-5
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 3)
    assert out[0, ids.shape[1]].item() == logits[0, -1].argmax().item()
