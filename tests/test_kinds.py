"""Embedding and convolution targets in every graph form, shared (tied) weights, and refused layer kinds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import peft_twin, rel_err, run
from torch import nn
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import Rule, RuleError


class DilatedCNN(nn.Module):
    """Stride, padding, dilation and a reflect padding mode: PEFT drops dilation; we must not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect")
        self.c3 = nn.Conv3d(6, 2, (1, 2, 2), dilation=(1, 2, 1))

    def forward(self, x):
        h = self.c1(x)
        h = self.c2(h.unsqueeze(-1) * h.unsqueeze(-2))
        return self.c3(h.unsqueeze(2))


class FunctionalKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 6))
        self.kernel = nn.Parameter(torch.randn(5, 6, 3) / 3)

    def forward(self, ids):
        h = F.embedding(ids, self.table, padding_idx=1)  # [B, T, 6]
        return F.conv1d(h.transpose(1, 2), self.kernel, None, 1, 1)


def merged_reference(model: nn.Module, lm, keys) -> nn.Module:
    """A copy of ``model`` whose targeted weights are W + s·ΔW (each copy untied from other uses)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for key in keys:
            t = next(t for t in lm.targets if t.key == key)
            owner_path, _, attr = t.weight_path.rpartition(".")
            owner = ref.get_submodule(owner_path.replace("graph_module.", "")) if owner_path else ref
            w = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(w + lm.unit(key).delta_weight().to(w.dtype)))
    return ref


@pytest.mark.parametrize("export", [False, True])
def test_dilation_stride_padding_modes_match_closed_form(export):
    torch.manual_seed(0)
    model, x = DilatedCNN().eval(), torch.randn(2, 3, 17)
    kw = {"example_inputs": (x,)} if export else {}
    ref_out = model(x)
    lm = lora_fx.lorafy(model, Rule(["c1", "c2", "c3"], r=3, alpha=6), **kw)
    assert torch.equal(lm(x), ref_out)  # identity at init
    for _, unit in lm.adapters.iter_units():
        nn.init.normal_(unit.lora_B)
    ref = merged_reference(model, lm, ["c1", "c2", "c3"])
    assert rel_err(lm(x).detach(), ref(x).detach()) < 1e-5
    assert {r["kind"] for r in lm.report().rows} == {"conv"}


@pytest.mark.parametrize("export", [False, True])
def test_functional_embedding_and_conv(export):
    torch.manual_seed(0)
    model, ids = FunctionalKinds(), torch.randint(0, 20, (3, 7))
    kw = {"example_inputs": (ids,)} if export else {}
    lm = lora_fx.lorafy(model, Rule(["table", "kernel"], r=2, init=False), **kw)
    assert sorted((r["key"], r["kind"]) for r in lm.report().rows) == [("kernel", "conv"), ("table", "embedding")]
    emb = lm.unit("table")
    assert emb.lora_A.shape == (2, 20) and emb.lora_B.shape == (6, 2)
    ref = merged_reference(model, lm, ["table", "kernel"])
    assert rel_err(lm(ids).detach(), ref(ids).detach()) < 1e-5


def test_embedding_init_is_identity_with_peft_layout():
    c = ZOO["embed"]
    lm = lora_fx.lorafy(c.build(), Rule(["emb"], r=4))
    unit = lm.unit("emb")
    assert unit.lora_A.shape == (4, 40) and unit.lora_B.shape == (16, 4)
    assert torch.count_nonzero(unit.lora_A) == 0 and torch.count_nonzero(unit.lora_B) > 0
    assert "dropout" not in lm.code  # no dropout on indices, as in PEFT


def test_kinds_filter():
    c = ZOO["cnn"]
    lm = lora_fx.lorafy(c.build(), Rule("*", kinds={"conv"}))
    assert sorted(r["key"] for r in lm.report().rows) == ["c1", "c2", "c3"]


def _gpt2_wte_reference(lm, model):
    """GPT-2 with wte = W + s·ΔW and lm_head still W: the tie broken for the targeted use only."""
    ref = copy.deepcopy(model)
    w = model.transformer.wte.weight
    with torch.no_grad():
        ref.transformer.wte.weight = nn.Parameter(w + lm.unit("transformer.wte").delta_weight())
        ref.lm_head.weight = nn.Parameter(w.clone())
    return ref


def test_tied_gpt2_wte_gets_lora_only_on_embedding_use():
    c = ZOO["gpt2"]
    model = c.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    x = c.inputs()
    lm = lora_fx.lorafy(model, Rule(["wte"], init=False), example_inputs=x)
    row = lm.report().rows[0]
    assert row["key"] == "transformer.wte" and row["kind"] == "embedding" and "shared weight" in row["action"]
    ref = _gpt2_wte_reference(lm, model)
    assert rel_err(output_tensor(lm(*x)).detach(), output_tensor(ref(*x)).detach()) < 1e-5
    pm = peft_twin(c, lm, target_modules=["wte"])
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6


def test_tied_weight_in_traced_model():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.out = nn.Linear(8, 30, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    torch.manual_seed(0)
    model, ids = Tied(), torch.randint(0, 30, (2, 5))
    lm = lora_fx.lorafy(model, Rule(["emb"], init=False))
    assert "shared weight" in lm.report().rows[0]["action"]
    w = model.emb.weight.detach()
    emb_w = w + lm.unit("emb").delta_weight()
    ref = F.linear(torch.tanh(F.embedding(ids, emb_w)), w)
    assert rel_err(lm(ids).detach(), ref) < 1e-6


@pytest.mark.parametrize("layer,fragment", [
    (nn.Conv2d(6, 6, 3, groups=3), "multiple of 3"),  # grouped convs take a rank that divides by groups
    (nn.ConvTranspose2d(4, 4, 3), "transposed"),
    (nn.EmbeddingBag(10, 4), "EmbeddingBag"),
    (nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
])
def test_unsupported_layers_are_refused_clearly(layer, fragment):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    with pytest.raises(RuleError) as e:
        lora_fx.lorafy(Wrap(), ["layer"])
    assert "'layer'" in str(e.value) and fragment in str(e.value)
