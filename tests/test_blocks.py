"""Block-structured graphs: repeated blocks kept as submodules, one template per group, graphs rebuilt from the
pristine capture, gradient checkpointing per block, regional compilation."""

import pytest
import torch
from helpers import rel_err, run
from torch import nn
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import Rule
from lora_fx.capture import capture
from lora_fx.capture.blocks import Block, Program


def _signature(graph):
    return [(n.op, n.name, str(n.target)) for n in graph.nodes]


def test_blocks_are_submodules_sharing_one_program():
    c = ZOO["llama"]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), **c.lorafy_kwargs())
    blocks = [lm.graph_module.get_submodule(f"model.layers.{i}") for i in range(2)]
    assert all(isinstance(b, Block) for b in blocks) and list(lm.blocks) == ["model.layers.0", "model.layers.1"]
    assert blocks[0].program is blocks[1].program and "linear_lora_group" in blocks[0].code
    outer = lm.graph_module.code
    assert 'getattr(self.model.layers, "0")(' in outer and "linear_lora_group" not in outer
    assert "blocks: 2 repeated blocks kept as submodules, 1 traced template(s)" in str(lm.report())
    assert not lora_fx.lorafy(ZOO["mlp"].build(), ["fc1"]).blocks  # nothing repeated: one graph


@pytest.mark.parametrize("name", ["llama", "gpt2", "mlp"])
def test_unload_returns_the_captured_graphs(name):
    c = ZOO[name]
    fresh = capture(c.build(), c.inputs() if c.export else ())
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False), **c.lorafy_kwargs())
    lm.add_adapter("b", Rule(c.targets[:1], r=2))
    lm.set_adapter(["default", "b"])
    lm.merge()
    lm.unmerge()
    gm = lm.unload()
    assert _signature(gm.graph) == _signature(fresh.graph)
    for path, block in fresh.blocks.items():
        assert _signature(gm.get_submodule(path).graph) == _signature(block.graph)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return x + self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))


class SharedLayers(nn.Module):
    """One layer applied at four depths (ALBERT-style weight sharing)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layer = Layer()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for _ in range(4):
            h = self.layer(h)
        return self.head(h)


@pytest.mark.parametrize("templates", [True, False])
def test_shared_layer_export_with_fused_siblings_matches_peft(templates, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from lora_fx.capture import templated

    if not templates:  # the one-piece export, where fusion once broke on the shared weights
        monkeypatch.setattr("lora_fx.capture.core.capture_templated",
                            lambda *a: (_ for _ in ()).throw(templated.TemplateMismatch("forced")))
    torch.manual_seed(0)
    model, x = SharedLayers().eval(), torch.randn(3, 5, 8)
    lm = lora_fx.lorafy(model, Rule(["q", "k", "v", "o"], r=4, init=False), example_inputs=(x,))
    assert bool(lm.blocks) == templates and "sibling groups" in str(lm.report())
    torch.manual_seed(0)
    pm = get_peft_model(SharedLayers().eval(), LoraConfig(target_modules=["q", "k", "v", "o"], r=4))
    with torch.no_grad():
        for key in ("layer.q", "layer.k", "layer.v", "layer.o"):
            mod = pm.base_model.model.get_submodule(key)
            mod.lora_A["default"].weight.copy_(lm.unit(key).lora_A)
            mod.lora_B["default"].weight.copy_(lm.unit(key).lora_B)
        assert rel_err(lm(x), pm(x)) < 1e-6


class Scaled(nn.Module):
    def __init__(self, scale: float, index: int):
        super().__init__()
        self.fc, self.scale, self.index = nn.Linear(8, 8), scale, index

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale


class Stack(nn.Module):
    def __init__(self, scales):
        super().__init__()
        self.layers = nn.ModuleList(Scaled(s, i) for i, s in enumerate(scales))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("export", [False, True])
def test_blocks_with_other_settings_get_their_own_template(export):
    torch.manual_seed(0)
    model, x = Stack([1.0, 2.0, 1.0, 2.0]), torch.randn(2, 8)
    lm = lora_fx.lorafy(model, Rule(["fc"], init=False), **({"example_inputs": (x,)} if export else {}))
    assert len(lm.blocks) == 4 and len(lm.state.captured.templates) == 2
    ref = x
    for i, layer in enumerate(model.layers):
        u = lm.unit(f"layers.{i}.fc")
        ref = torch.tanh(layer.fc(ref) + u.scaling * ref @ u.lora_A.T @ u.lora_B.T) * layer.scale
    assert rel_err(lm(x).detach(), ref.detach()) < 1e-6


class IndexDependent(Scaled):
    def forward(self, x):  # depends on an index attribute that the block grouping ignores
        return torch.tanh(self.fc(x)) * (self.index + 1)


def test_a_template_that_does_not_reproduce_the_model_falls_back_to_one_graph():
    torch.manual_seed(0)
    model, x = Stack([1.0, 1.0, 1.0]), torch.randn(2, 8)
    model.layers = nn.ModuleList(IndexDependent(1.0, i) for i in range(3))
    ref = model(x)
    lm = lora_fx.lorafy(model, ["fc"], example_inputs=(x,))
    assert not lm.blocks and torch.equal(lm(x), ref)


def _grads(lm, case, seed=0):
    for p in lm.trainable_parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = output_tensor(lm(*case.inputs()))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    return [p.grad.clone() for p in lm.trainable_parameters()]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    c = ZOO[name]
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, init=False, dropout=0.1), **c.lorafy_kwargs())
    lm.train()
    plain = _grads(lm, c)
    lm.gradient_checkpointing_enable()
    assert lm.is_gradient_checkpointing
    checkpointed = _grads(lm, c)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed))
    lm.gradient_checkpointing_disable()
    assert not lm.is_gradient_checkpointing


def test_gradient_checkpointing_needs_blocks():
    lm = lora_fx.lorafy(ZOO["mlp"].build(), ["fc1"])
    with pytest.raises(lora_fx.AdapterError, match="no repeated"):
        lm.gradient_checkpointing_enable()


def test_regional_compile_reuses_one_graph_for_all_blocks():
    """Four blocks, two compiled graphs: the first block's input (the frozen embedding's output) needs no
    gradient, every later block's does; depth adds none."""
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).eval()
    c = ZOO["llama"]
    lm = lora_fx.lorafy(model, Rule(c.targets, init=False), example_inputs=c.inputs())
    eager = _grads(lm, c)
    torch._dynamo.reset()
    counters.clear()
    assert lora_fx.compile(lm) is lm  # compiled in place, block by block
    lm.gradient_checkpointing_enable()
    compiled = _grads(lm, c)
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(compiled, eager))
    assert counters["stats"]["unique_graphs"] == 2 and sum(counters["graph_break"].values()) == 0
    with torch.no_grad():
        assert rel_err(output_tensor(lm(*c.inputs())), output_tensor(model(*c.inputs()))) > 0  # LoRA is on
        lm.merge()
        assert torch.allclose(output_tensor(lm(*c.inputs())), output_tensor(model(*c.inputs())), atol=1e-5)


def test_deep_model_rebuilds_one_program_per_verb(monkeypatch):
    """64 layers: one template, one program per rebuild whatever the depth, and an outer graph that grows by the
    adapter inputs each block call takes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=64,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32)).eval()
    ids = torch.randint(0, 32, (2, 6))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lm = lora_fx.lorafy(model, Rule(targets, r=2, init=False), example_inputs=(ids,))
    assert len(lm.blocks) == 64 and len(lm.state.captured.templates) == 1
    captured = len(lm.state.captured.graph.nodes)
    assert len(lm.graph_module.graph.nodes) == captured + 64 * 14  # A and B of 7 targets per block call
    built = []
    original = Program.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Program, "__init__", counting)
    lm.add_adapter("b", Rule(["q_proj"], r=2))
    for verb in (lambda: lm.set_adapter("b"), lambda: lm.set_adapter("default"), lm.merge, lm.unmerge):
        built.clear()
        verb()
        assert len(built) == 1
    assert len({id(b.program) for b in lm.blocks.values()}) == 1
    before = run(lm, ZOO["llama"], (ids,))
    lm.merge()
    assert rel_err(run(lm, ZOO["llama"], (ids,)), before) < 1e-4  # float32 rounding through 64 layers
