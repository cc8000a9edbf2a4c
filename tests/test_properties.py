"""Property-based checks on random MLPs (hypothesis, a fast derandomized profile so CI stays quick and
deterministic): init leaves outputs unchanged, PEFT parity, merge/unmerge and save/load bit for bit."""

import tempfile

import torch
from helpers import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

import lora_fx
from lora_fx import Rule

FAST = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Net(nn.Module):
    def __init__(self, sizes: list[int], bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.tanh(layer(x))
        return x


nets = st.fixed_dictionaries({
    "sizes": st.lists(st.integers(2, 12), min_size=2, max_size=4),
    "bias": st.booleans(),
    "r": st.integers(1, 6),
    "alpha": st.sampled_from([1, 4, 16]),
    "rslora": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def _build(spec):
    torch.manual_seed(spec["seed"])
    model = Net(spec["sizes"], spec["bias"]).eval()
    sizes = spec["sizes"]
    r = min(spec["r"], *(max(a, b) for a, b in zip(sizes, sizes[1:])))  # larger r adds no rank: refused
    return model, Rule(["layers.*"], r=r, alpha=spec["alpha"], use_rslora=spec["rslora"], init=False)


def _x(spec):
    return torch.randn(3, spec["sizes"][0], generator=torch.Generator().manual_seed(spec["seed"]))


@FAST
@given(nets)
def test_init_is_identity_and_parity_with_peft(spec):
    model, rule = _build(spec)
    x = _x(spec)
    with torch.no_grad():
        base = model(x)
        identity = lora_fx.lorafy(_copy(model), Rule(["layers.*"], r=rule.r))
        assert torch.equal(identity(x), base)
        lm = lora_fx.lorafy(_copy(model), rule)
        pm = get_peft_model(_copy(model), LoraConfig(target_modules=r"layers\.\d+", r=rule.r, lora_alpha=rule.alpha,
                                                     use_rslora=rule.use_rslora))
        for unit in lm.adapters.units("default").values():
            mod = pm.base_model.model.get_submodule(unit.key)
            mod.lora_A["default"].weight.copy_(unit.lora_A)
            mod.lora_B["default"].weight.copy_(unit.lora_B)
        assert rel_err(lm(x), pm(x)) < 1e-5


@FAST
@given(nets)
def test_merge_unmerge_and_save_load_are_exact(spec):
    model, rule = _build(spec)
    x = _x(spec)
    lm = lora_fx.lorafy(model, rule)
    weights = {n: p.detach().clone() for n, p in lm.graph_module.named_parameters() if "lora" not in n}
    with torch.no_grad():
        unmerged = lm(x)
        lm.merge()
        assert rel_err(lm(x), unmerged) < 1e-5
        lm.unmerge()
        assert all(torch.equal(p, weights[n]) for n, p in lm.graph_module.named_parameters() if n in weights)
        assert torch.equal(lm(x), unmerged)
        with tempfile.TemporaryDirectory() as tmp:
            lm.save_pretrained(tmp)
            loaded = lora_fx.from_peft(_copy_of(spec), tmp)
        for key, unit in lm.adapters.units("default").items():
            assert torch.equal(loaded.unit(key).lora_A, unit.lora_A)
            assert torch.equal(loaded.unit(key).lora_B, unit.lora_B)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _copy_of(spec):
    torch.manual_seed(spec["seed"])
    return Net(spec["sizes"], spec["bias"]).eval()
