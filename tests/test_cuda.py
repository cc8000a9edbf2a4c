"""CUDA cases (marker ``cuda``; skipped without a GPU): fused ops, the fused loss, generate, the adapter bank,
QLoRA with bitsandbytes' CUDA kernels and compiled training, each against PEFT or the unfused computation.
``benchmarks/gpu.sh`` runs them on a GPU machine."""

import pytest
import torch
from helpers import peft_twin, rel_err
from zoo import ZOO

import lora_fx
from lora_fx import Rule

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _llama(**kw):
    c = ZOO["llama"]
    torch.manual_seed(0)
    lm = lora_fx.lorafy(c.build().cuda(), Rule(c.targets, r=4, init=False),
                        example_inputs=(c.inputs()[0].cuda(),), **kw)
    return c, lm


def test_forward_and_gradients_equal_peft_on_cuda():
    c, lm = _llama()
    pm = peft_twin(c, lm, r=4).cuda().train()
    ids = c.inputs()[0].cuda()
    lm.train()
    ours, theirs = lm(ids).logits, pm(input_ids=ids).logits
    assert rel_err(ours.detach(), theirs.detach()) < 1e-4
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    for key, unit in lm.adapters.units("default").items():
        layer = pm.base_model.model.get_submodule(key)
        assert rel_err(unit.lora_A.grad, layer.lora_A["default"].weight.grad) < 1e-3


def test_fused_loss_equals_unfused_on_cuda():
    c, plain = _llama()
    _, fused = _llama(fused_loss=True)
    ids = c.inputs()[0].cuda()
    a, b = plain(input_ids=ids, labels=ids).loss, fused(input_ids=ids, labels=ids).loss
    a.backward()
    b.backward()
    assert rel_err(b.detach(), a.detach()) < 1e-5
    for p, q in zip(fused.trainable_parameters(), plain.trainable_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4


def test_generate_equals_peft_on_cuda():
    c, lm = _llama()
    pm = peft_twin(c, lm, r=4).cuda()
    ids = c.inputs()[0].cuda()[:1]
    ours = lm.generate(ids, max_new_tokens=8, eos_token_id=[])
    theirs = pm.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_routed_rows_on_cuda():
    c, lm = _llama()
    lm.add_adapter("b", Rule(c.targets[:2], r=8, init=False))
    ids = c.inputs()[0].cuda()
    with torch.no_grad():
        alone = {}
        for name in ("default", "b"):
            lm.set_adapter(name)
            alone[name] = lm(ids).logits
        mixed = lm(ids, adapter_names=["b", "default"]).logits
    assert rel_err(mixed[0], alone["b"][0]) < 1e-5 and rel_err(mixed[1], alone["default"][1]) < 1e-5


def test_qlora_4bit_on_cuda():
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quant = nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"), nn.ReLU(),
                          bnb.nn.Linear4bit(64, 32, quant_type="nf4"))
    quant.load_state_dict(model.state_dict())
    quant = quant.cuda()
    x = torch.randn(8, 64, device="cuda")
    with torch.no_grad():
        ref = quant(x)
    lm = lora_fx.lorafy(quant, ["0", "2"], example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(lm(x), ref) < 1e-3
    lm.train()
    lm(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in lm.trainable_parameters())


def test_compiled_training_step_has_no_graph_break_on_cuda():
    from torch._dynamo.utils import counters

    c, lm = _llama()
    lm.train()
    torch._dynamo.reset()
    counters.clear()
    lora_fx.compile(lm)
    ids = c.inputs()[0].cuda()
    lm(input_ids=ids).logits.float().pow(2).mean().backward()
    assert sum(counters["graph_break"].values()) == 0
