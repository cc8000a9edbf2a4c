"""LoraModel behaviour: capture paths, parameter sharing, training, dropout modes, adapters, errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, run
from torch import nn
from zoo import MLP, ZOO, output_tensor

import lora_fx
from lora_fx import CaptureError, Rule, RuleError


def test_graph_shares_model_parameters(case):
    model = case.build()
    lm = lora_fx.lorafy(model, case.targets, **case.lorafy_kwargs())
    own = {id(p) for p in model.parameters()}
    base = [p for n, p in lm.graph_module.named_parameters() if not n.startswith("lora.")]
    assert base and all(id(p) in own for p in base)


def test_exactly_adapter_parameters_are_trainable(case):
    lm = lora_fx.lorafy(case.build(), case.targets, **case.lorafy_kwargs())
    trainable = {id(p) for p in lm.trainable_parameters()}
    assert trainable == {id(p) for p in lm.adapters.parameters()}
    assert lm.get_nb_trainable_parameters()[0] == sum(p.numel() for p in lm.adapters.parameters())


def test_training_moves_only_adapters_and_lowers_loss(case):
    model = case.build()
    lm = lora_fx.lorafy(model, Rule(case.targets, r=4, alpha=8), **case.lorafy_kwargs())
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = case.inputs()
    target = torch.randn_like(output_tensor(lm(*inputs)))
    opt = torch.optim.Adam(lm.trainable_parameters(), lr=2e-2)
    lm.train()
    losses = []
    for _ in range(25):
        loss = F.mse_loss(output_tensor(lm(*inputs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters())
    assert any(torch.count_nonzero(u.lora_B) for _, u in lm.adapters.iter_units())


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_dropout_follows_train_and_eval(name):
    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, dropout=0.5, init=False), **c.lorafy_kwargs())
    assert "dropout" in lm.code
    lm.eval()
    assert torch.equal(run(lm, c), run(lm, c))
    lm.train()
    torch.manual_seed(0)
    a = run(lm, c)
    b = run(lm, c)
    assert not torch.equal(a, b)
    lm.eval()
    assert all(not m.training for m in lm.adapters.modules())


def test_zero_dropout_inserts_no_dropout_node():
    lm = lora_fx.lorafy(MLP(), ["fc1"])
    assert "dropout" not in lm.code
    assert "self.lora.default.fc1.lora_A" in lm.code


def test_graph_module_input_is_accepted():
    gm = torch.fx.symbolic_trace(MLP())
    lm = lora_fx.lorafy(gm, ["fc1"])
    assert lm.graph_module is gm and [r["key"] for r in lm.report().rows] == ["fc1"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace fails
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_asks_for_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        lora_fx.lorafy(Untraceable(), ["fc"])


def test_rule_matching_nothing_names_rule_and_lists_keys():
    model = MLP()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuleError) as e:
        lora_fx.lorafy(model, ["q_proj"])
    assert "'q_proj'" in str(e.value) and "'fc1'" in str(e.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_unused_rules_appear_in_report():
    lm = lora_fx.lorafy(MLP(), ["fc1", "nothing_here"])
    text = str(lm.report())
    assert "rules that matched nothing: 'nothing_here'" in text
    assert "1 targets, " in text and "trainable:" in text


def test_excluded_keys_get_no_lora():
    lm = lora_fx.lorafy(MLP(), [Rule("head", exclude=True), Rule("*")])
    assert sorted(r["key"] for r in lm.report().rows) == ["fc1", "fc2"]


def test_second_adapter_and_set_adapter():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(["fc1"], init=False))
    out_a = run(lm, c)
    lm.add_adapter("other", Rule(["fc2"], r=2, init=False))
    assert lm.active_adapters == ["default"] and torch.equal(run(lm, c), out_a)
    assert all(not p.requires_grad for p in lm.adapters.other.parameters())
    lm.set_adapter("other")
    assert "lora.other.fc2" in lm.code and "lora.default" not in lm.code
    assert all(p.requires_grad for p in lm.adapters.other.parameters())
    lm.set_adapter(["default", "other"])
    model = c.build()
    x = c.inputs()[0]
    u1, u2 = lm.unit("fc1", "default"), lm.unit("fc2", "other")
    h = torch.relu(F.linear(x, model.fc1.weight + u1.scaling * u1.lora_B @ u1.lora_A, model.fc1.bias))
    h = torch.relu(F.linear(h, model.fc2.weight + u2.scaling * u2.lora_B @ u2.lora_A))
    assert rel_err(run(lm, c), model.head(h).detach()) < 1e-6
    with pytest.raises(lora_fx.AdapterError, match="No adapter named 'missing'"):
        lm.set_adapter("missing")


def test_dtype_change_rebuilds_casts():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False))
    lm.to(torch.float64)
    x = c.inputs()[0].double()
    assert run(lm, c, (x,)).dtype == torch.float64


def test_print_trainable_parameters_format(capsys):
    lm = lora_fx.lorafy(MLP(), ["fc1"])
    lm.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.startswith("trainable params: 288 || all params: ") and "trainable%: " in out


def test_ruleset_options_and_report_lines():
    lm = lora_fx.lorafy(MLP(), lora_fx.RuleSet([Rule(["fc1", "fc2"])], bias="lora_only", modules_to_save=("head",)))
    text = str(lm.report())
    assert "modules_to_save: head -> trainable copy" in text and "bias='lora_only': 1 base biases" in text
    assert [r["key"] for r in lm.report().rows] == ["fc1", "fc2"]
    trainable = {id(p) for p in lm.trainable_parameters()}
    assert id(lm.graph_module.fc1.bias) in trainable and id(lm.graph_module.head.weight) not in trainable
    with pytest.raises(RuleError, match="bias="):
        lora_fx.RuleSet([Rule("fc1")], bias="some")


def test_failed_lorafy_leaves_a_graph_module_input_untouched():
    gm = torch.fx.symbolic_trace(MLP())
    code, names = gm.code, [n for n, _ in gm.named_modules()]
    with pytest.raises(RuleError):
        lora_fx.lorafy(gm, ["nothing"])
    assert gm.code == code and [n for n, _ in gm.named_modules()] == names and not hasattr(gm, "lora")
