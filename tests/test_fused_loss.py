"""The fused linear cross-entropy: the model's own LM loss and every adapter gradient equal the unfused step's,
without the logits; and outputs of fused LoRA ops can be modified in place in training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from zoo import ZOO

import lora_fx
from lora_fx import Rule
from lora_fx.ops.fused_loss import linear_cross_entropy


def _step(lm, ids, **kwargs):
    for p in lm.trainable_parameters():
        p.grad = None
    out = lm(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = [p.grad.clone() for p in lm.trainable_parameters()]
    return out, grads


@pytest.mark.parametrize("name,head,dropout", [("llama", False, 0.0), ("gpt2", False, 0.0), ("llama", True, 0.0),
                                               ("qwen2", True, 0.1)])
def test_fused_loss_equals_the_models_own_loss_and_gradients(name, head, dropout):
    c = ZOO[name]
    targets = [*c.targets, "lm_head"] if head else c.targets
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        lm = lora_fx.lorafy(c.build(), Rule(targets, r=4, dropout=dropout, init=False), **c.lorafy_kwargs(),
                            fused_loss=fused)
        lm.train()
        torch.manual_seed(1)
        results.append(_step(lm, c.inputs()[0]))
    (plain, g_plain), (fused, g_fused) = results
    assert fused.logits is None and plain.logits is not None
    assert rel_err(fused.loss.detach(), plain.loss.detach()) < 1e-6
    assert len(g_fused) == len(g_plain) and all(rel_err(a, b) < 1e-5 for a, b in zip(g_fused, g_plain))
    assert "fuse_loss: the loss after lm_head" in str(lm.report())


def test_fused_loss_with_num_items_in_batch_and_padding_labels():
    c = ZOO["llama"]
    ids = c.inputs()[0]
    labels = ids.clone()
    labels[0, :3] = -100
    losses = []
    for fused in (False, True):
        torch.manual_seed(0)
        lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, init=False), **c.lorafy_kwargs(), fused_loss=fused)
        out = lm(input_ids=ids, labels=labels, num_items_in_batch=11)
        out.loss.backward()
        losses.append((out.loss.detach(), [p.grad.clone() for p in lm.trainable_parameters()]))
    assert rel_err(losses[1][0], losses[0][0]) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(losses[1][1], losses[0][1]))


def test_calls_without_labels_keep_their_logits():
    c = ZOO["llama"]
    torch.manual_seed(0)
    plain = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, init=False), **c.lorafy_kwargs())
    torch.manual_seed(0)
    fused = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, init=False), **c.lorafy_kwargs(), fused_loss=True)
    with torch.no_grad():
        assert torch.equal(fused(c.inputs()[0]).logits, plain(c.inputs()[0]).logits)


def test_the_op_matches_cross_entropy_in_chunks(monkeypatch):
    from lora_fx.ops import fused_loss

    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 64)  # many chunks on a small problem
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    hl = (h * 1.5).detach().requires_grad_(True)
    labels = torch.randint(0, 11, (37,), generator=g)
    labels[::5] = -100
    for reduction in ("mean", "sum"):
        ours = linear_cross_entropy(h, w, b, hl, a, bb, 0.5, labels, -100, reduction, torch.float64)
        logits = F.linear(h, w, b) + 0.5 * F.linear(F.linear(hl, a), bb)
        ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
        torch.testing.assert_close(ours, ref)
        got = torch.autograd.grad(2 * ours, (h, w, b, hl, a, bb))
        want = torch.autograd.grad(2 * ref, (h, w, b, hl, a, bb))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)


class InPlace(nn.Module):
    """In-place ops right after target outputs: add_, ReLU(inplace=True), mul_."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.fc(x)
        y.add_(x)
        w = self.fc3(self.act(self.fc2(y)))
        w.mul_(2.0)
        return w


@pytest.mark.parametrize("export", [False, True], ids=["traced", "exported"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_outputs_of_fused_ops_can_be_modified_in_place_in_training(export, compiled):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    base = InPlace()
    kw = {"example_inputs": (x,)} if export else {}
    rule = Rule(["fc", "fc2", "fc3"], r=2, init=False)
    fused = lora_fx.lorafy(copy.deepcopy(base), rule, **kw).train()
    plain = lora_fx.lorafy(copy.deepcopy(base), rule, fuse=False, **kw).train()
    plain.adapters.load_state_dict(fused.adapters.state_dict())
    run = torch.compile(fused) if compiled else fused
    out = run(x)
    out.pow(2).sum().backward()
    ref = plain(x)
    ref.pow(2).sum().backward()
    assert rel_err(out.detach(), ref.detach()) < 1e-6
    for p, q in zip(fused.trainable_parameters(), plain.trainable_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5


def test_trainer_trains_and_evaluates_with_the_fused_loss(tmp_path):
    from peft import LoraConfig
    from test_training import CONFIG, _dataset, _llama
    from transformers import Trainer, TrainingArguments, set_seed

    results = []
    for fused in (False, True):
        set_seed(0)
        lm = lora_fx.lorafy(_llama(), LoraConfig(**CONFIG), example_inputs=(torch.randint(0, 96, (2, 8)),),
                            fused_loss=fused)
        args = TrainingArguments(output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=4, max_steps=3,
                                 logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no")
        trainer = Trainer(model=lm, args=args, train_dataset=_dataset(), eval_dataset=_dataset())
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results.append((losses, trainer.evaluate()["eval_loss"]))
    (plain, plain_eval), (fused, fused_eval) = results
    assert torch.allclose(torch.tensor(fused), torch.tensor(plain), rtol=1e-5)
    assert abs(fused_eval - plain_eval) < 1e-5 * abs(plain_eval)
