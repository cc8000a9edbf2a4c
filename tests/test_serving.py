"""Serving under load and bad input: a bounded cache of derived graphs (LRU), failed captures remembered, values
that are data not captured anew, and calls lora_fx cannot serve refused by name with nothing changed."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO

import lora_fx
from lora_fx import AdapterError, CaptureError, Rule


def _llama():
    c = ZOO["llama"]
    return lora_fx.lorafy(c.build(), Rule(["q_proj", "v_proj"], r=4, init=False), **c.lorafy_kwargs()), c


def test_derived_graphs_are_bounded_and_least_recently_used_go_first():
    lm, c = _llama()
    ids = c.inputs()[0]
    lm.graph_cache_size = 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = {name: lm(ids, **kw).logits for name, kw in
                [("mask", {"attention_mask": mask}), ("labels", {"labels": ids}),
                 ("both", {"attention_mask": mask, "labels": ids})]}
    assert len(lm.derived_graphs) == 2  # the first of three signatures was evicted
    with torch.no_grad():
        again = lm(ids, attention_mask=mask).logits  # captured again on demand, same values
    assert torch.equal(again, want["mask"]) and len(lm.derived_graphs) == 2
    with pytest.raises(AdapterError, match="positive integer"):
        lm.graph_cache_size = 0


def test_logits_to_keep_is_data_not_a_new_graph():
    lm, c = _llama()
    ids = c.inputs()[0]
    with torch.no_grad():
        full = lm(ids).logits
        for k in (2, 3, 5):
            assert torch.allclose(lm(ids, logits_to_keep=k).logits, full[:, -k:], atol=1e-6)
    assert len(lm.derived_graphs) == 1  # one capture serves every k > 1 (k = 1 has a size-1 dimension)


def test_a_failed_capture_is_remembered_and_named(monkeypatch):
    lm, c = _llama()
    ids = c.inputs()[0]
    calls = []
    import lora_fx.model.calls as calls_module

    real = calls_module.capture_call

    def failing(*args, **kwargs):
        calls.append(1)
        raise CaptureError("could not capture this call")
    monkeypatch.setattr(calls_module, "capture_call", failing)
    for _ in range(3):
        with pytest.raises(CaptureError, match="could not capture this call"):
            lm(ids, attention_mask=torch.ones_like(ids))
    assert len(calls) == 1
    monkeypatch.setattr(calls_module, "capture_call", real)


def test_use_cache_is_refused_by_name():
    lm, c = _llama()
    with pytest.raises(AdapterError, match="use_cache=True.*lm.generate"):
        lm(c.inputs()[0], use_cache=True)


def test_a_dtype_change_of_an_exported_model_is_refused_with_nothing_cast():
    lm, c = _llama()
    before = {n: p.dtype for n, p in lm.named_parameters()}
    for cast in (lambda: lm.to(torch.bfloat16), lambda: lm.half(), lambda: lm.double()):
        with pytest.raises(AdapterError, match="captured by torch.export.*Nothing was cast"):
            cast()
    assert {n: p.dtype for n, p in lm.named_parameters()} == before
    lm.to(torch.float32)  # the dtype it has: fine
    traced = lora_fx.lorafy(ZOO["mlp"].build(), Rule(["fc1"], r=2))
    traced.double()  # a traced graph follows its weights' dtype
    assert traced(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


def test_generate_on_an_empty_batch_or_prompt_is_named():
    lm, _ = _llama()
    for ids in (torch.zeros(0, 4, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(AdapterError, match="at least one row and one prompt token"):
            lm.generate(ids, max_new_tokens=2)


def test_default_compile_does_not_recompile_on_adapter_switches(tmp_path):
    """``lora_fx.compile`` of an eval model compiles its graphs, not its Python; a second adapter is banked as it
    is added (one rebuild), then routes, set_adapter and hot swaps change tensors only: no new graph."""
    from torch._dynamo.utils import counters

    lm, c = _llama()
    lm.eval()
    ids = c.inputs()[0]
    torch._dynamo.reset()
    counters.clear()
    assert lora_fx.compile(lm) is lm
    with torch.no_grad():
        lm(ids)
        lm.add_adapter("b", Rule(["q_proj", "v_proj"], r=4, init=False))  # banks both: the graphs change once
        assert lm.state.bank is not None
        lm.save_pretrained(tmp_path)
        lm.set_adapter("b")
        want = {"b": lm(ids).logits}
        lm.set_adapter("default")
        want["default"] = lm(ids).logits
        graphs = counters["stats"]["unique_graphs"]
        for i in range(20):
            routed = lm(ids, adapter_names=[("default", "b")[(i + row) % 2] for row in range(len(ids))]).logits
            assert torch.allclose(routed[0], want[("default", "b")[i % 2]][0], atol=1e-5)
        for name in ("b", "default") * 3:
            lm.set_adapter(name)
            assert torch.allclose(lm(ids).logits, want[name], atol=1e-5)
        for _ in range(3):
            lm.load_adapter(tmp_path / "b", "b", hotswap=True)
            lm(ids)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == 0
