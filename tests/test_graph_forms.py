"""Graph forms: output slices of fused projections, x @ W.T recognisers, MultiheadAttention, PEFT's embedding
base-weight saves, and the self.training warning."""

import copy
import warnings

import pytest
import torch
from helpers import rel_err, run
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import Rule
from lora_fx.errors import CheckpointError, RuleError

SLICES = ((0, 16), (24, 32))  # q (16 features) and v (8): uneven, k left alone


def closed_form(model: nn.Module, lm, adapter: str = "default", weight_attr: str = ".weight") -> nn.Module:
    """``model`` with ``W + s·ΔW`` written into each of ``lm``'s targets (the reference for forms PEFT lacks)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for key, unit in lm.adapters.units(adapter).items():
            ref.get_parameter(key + weight_attr).add_(unit.delta_weight())
    return ref


# ---- out_slices ------------------------------------------------------------------------------------------

def sliced(init=False, **kw):
    c = ZOO["fused_qkv"]
    lm = lora_fx.lorafy(c.build(), [Rule("qkv", r=2, alpha=4, init=init, out_slices=SLICES, **kw),
                                    Rule("out", r=2, alpha=4, init=init)])
    return c, lm


def test_slices_equal_the_closed_form_and_touch_only_their_outputs():
    c, lm = sliced()
    unit = lm.adapters.unit("default", "qkv")
    assert unit.lora_A.shape == (4, 16) and unit.lora_B.shape == (24, 2)  # 2 slices x r=2; 16 + 8 rows
    delta = unit.delta_weight()
    assert torch.count_nonzero(delta[16:24]) == 0 and torch.count_nonzero(delta[:16]) > 0
    assert rel_err(run(lm, c), run(closed_form(c.build(), lm), c)) < 1e-6
    rows = [r for r in lm.report().rows if r["key"].startswith("qkv")]
    assert [(r["key"], r["out"], r["params"]) for r in rows] == [("qkv[0:16]", 16, 64), ("qkv[24:32]", 8, 48)]


def test_slices_train_only_their_blocks():
    c, lm = sliced(init=True)
    assert torch.equal(run(lm, c), run(c.build(), c))  # init leaves outputs unchanged
    opt = torch.optim.SGD(lm.trainable_parameters(), lr=0.5)
    for _ in range(3):
        loss = output_tensor(lm(*c.inputs())).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    delta = lm.adapters.unit("default", "qkv").delta_weight()
    assert torch.count_nonzero(delta[:16]) > 0 and torch.count_nonzero(delta[24:]) > 0
    assert torch.count_nonzero(delta[16:24]) == 0  # the k part never gets an update


def test_slices_save_as_an_equivalent_peft_adapter_and_load_back_sliced(tmp_path):
    c, lm = sliced()
    lm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.qkv.lora_B.weight"].shape == (32, 4)  # PEFT's whole-layer B
    pm = PeftModel.from_pretrained(c.build(), tmp_path).eval()
    assert rel_err(run(pm, c), run(lm, c)) < 1e-6
    back = lora_fx.from_peft(c.build(), tmp_path)
    assert back.adapters.unit("default", "qkv").variant.ranges == SLICES
    assert back.adapters.unit("default", "qkv").lora_B.shape == (24, 2)
    assert torch.equal(run(back, c), run(lm, c))


def test_slices_merge_and_unmerge():
    c, lm = sliced()
    base = c.build().qkv.weight.detach().clone()
    before = run(lm, c)
    lm.merge()
    assert rel_err(run(lm, c), before) < 1e-6
    lm.unmerge()
    assert torch.allclose(lm.graph_module.get_parameter("qkv.weight"), base, atol=1e-7)


def test_gpt2_c_attn_q_and_v_slices_match_peft(tmp_path):
    c = ZOO["gpt2"]
    lm = lora_fx.lorafy(c.build(), Rule("c_attn", r=2, init=False, out_slices=((0, 32), (64, 96))),
                        **c.lorafy_kwargs())
    lm.save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(c.build(), tmp_path).eval()
    assert rel_err(run(lm, c), run(c.build(), c)) > 1e-4
    assert rel_err(run(pm, c), run(lm, c)) < 1e-6


@pytest.mark.parametrize("slices, match", [(((0, 8), (4, 12)), "overlap"), (((4, 2),), "empty"),
                                           (((0, 40),), "output features"), ((), "non-empty")])
def test_bad_slices_are_refused_by_name(slices, match):
    with pytest.raises(RuleError, match=match):
        lora_fx.lorafy(ZOO["fused_qkv"].build(), Rule("qkv", r=2, out_slices=slices))


def test_slices_refuse_dora_other_kinds_and_whole_layer_checkpoints(tmp_path):
    with pytest.raises(RuleError, match="DoRA"):
        Rule("qkv", out_slices=SLICES, use_dora=True)
    with pytest.raises(RuleError, match="linear targets only"):
        lora_fx.lorafy(ZOO["embed"].build(), Rule("emb", r=2, out_slices=((0, 4),)))
    c, lm = sliced()
    lm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.qkv.lora_B.weight"][20, 0] = 1.0  # a value in the k rows: not a sliced adapter
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CheckpointError, match="outside the output slices"):
        lora_fx.from_peft(c.build(), tmp_path)


# ---- x @ W.T and W @ x forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("export", [False, True], ids=["traced", "exported"])
def test_linear_subclass_computing_x_at_w_t_matches_peft(export):
    c = ZOO["transposed"]
    kwargs = {"example_inputs": c.inputs()} if export else {}
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=2, init=False), **kwargs)
    ops = {r["key"]: r["op"] for r in lm.report().rows}
    assert ops == {"fc1": ("aten.matmul" if export else "matmul") + " (x @ W.T)",
                   "fc2": ("aten.matmul" if export else "matmul") + " (x @ W.T)"}
    pm = get_peft_model(c.build(), LoraConfig(r=2, target_modules=c.targets)).eval()
    with torch.no_grad():
        for key in c.targets:
            unit = lm.adapters.unit("default", key)
            pm.base_model.model.get_submodule(key).lora_A["default"].weight.copy_(unit.lora_A)
            pm.base_model.model.get_submodule(key).lora_B["default"].weight.copy_(unit.lora_B)
    assert rel_err(run(lm, c), run(c.build(), c)) > 1e-3
    assert rel_err(run(lm, c), run(pm, c)) < 1e-6


class Forms(nn.Module):
    """Every transposed-weight form: W.t(), transpose, permute, mT, and the weight on the left (W @ x.T)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, 8) / 3)
        self.b = nn.Parameter(torch.randn(8, 8) / 3)
        self.c = nn.Parameter(torch.randn(8, 8) / 3)
        self.d = nn.Parameter(torch.randn(8, 8) / 3)
        self.e = nn.Parameter(torch.randn(6, 8) / 3)

    def forward(self, x):
        x = torch.matmul(x, self.a.t())
        x = x @ self.b.transpose(0, 1)
        x = torch.mm(x, self.c.permute(1, 0))
        x = x @ self.d.mT
        return (self.e @ x.T).T  # [6, N] -> [N, 6]


@pytest.mark.parametrize("export", [False, True], ids=["traced", "exported"])
def test_every_transposed_form_equals_the_closed_form(export):
    torch.manual_seed(0)
    model, x = Forms(), torch.randn(5, 8)
    lm = lora_fx.lorafy(model, Rule(["a", "b", "c", "d", "e"], r=2, init=False),
                        **({"example_inputs": (x,)} if export else {}))
    forms = {r["key"]: r["op"].split(" ", 1)[1] for r in lm.report().rows}
    assert forms == {"a": "(x @ W.T)", "b": "(x @ W.T)", "c": "(x @ W.T)", "d": "(x @ W.T)", "e": "(W @ x)"}
    ref = closed_form(model, lm, weight_attr="")
    with torch.no_grad():
        assert rel_err(lm(x), ref(x)) < 1e-6 and rel_err(lm(x), model(x)) > 1e-3
    lm.merge()
    with torch.no_grad():
        assert rel_err(lm(x), ref(x)) < 1e-6


def test_left_operand_refuses_dora():
    with pytest.raises(RuleError, match="left operand"):
        lora_fx.lorafy(Forms(), Rule("e", r=2, use_dora=True))


# ---- MultiheadAttention ---------------------------------------------------------------------------------------

class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def attn_case():
    torch.manual_seed(0)
    return Attn().eval(), torch.randn(3, 5, 16)


def test_multihead_attention_saves_in_peft_layout_both_ways(tmp_path):
    model, x = attn_case()
    lm = lora_fx.lorafy(model, Rule("attn", r=2, init=False), example_inputs=(x,)).eval()
    assert [r["key"] for r in lm.report().rows] == ["attn"]  # PEFT's key for the packed q/k/v projection
    lm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing-keys warning from PEFT: its out_proj LoRA is saved as zeros
        pm = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(lm(x), model(x)) > 1e-3
        assert rel_err(pm(x), lm(x)) < 1e-6
        back = lora_fx.from_peft(copy.deepcopy(model), tmp_path, example_inputs=(x,)).eval()
        assert torch.equal(back(x), lm(x))


def test_multihead_attention_reads_peft_adapters_and_refuses_what_peft_ignores(tmp_path):
    model, x = attn_case()
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["attn"]))
    with torch.no_grad():
        pm.base_model.model.attn.lora_B["default"].weight.normal_()
    pm.save_pretrained(tmp_path / "peft")
    lm = lora_fx.from_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,)).eval()
    with torch.no_grad():
        assert rel_err(lm(x), pm.eval()(x)) < 1e-6
        pm.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.normal_()
    pm.save_pretrained(tmp_path / "trained_out_proj")
    with pytest.raises(CheckpointError, match="out_proj"):
        lora_fx.from_peft(copy.deepcopy(model), tmp_path / "trained_out_proj", example_inputs=(x,))
    lm = lora_fx.lorafy(model, Rule("attn.out_proj", r=2), example_inputs=(x,))
    with pytest.raises(CheckpointError, match="out_proj"):
        lm.save_pretrained(tmp_path / "ours")
    assert not (tmp_path / "ours" / "adapter_config.json").exists()


# ---- PEFT's embedding base-weight saves ---------------------------------------------------------------------

def test_peft_saved_embedding_weights_are_read_and_written(tmp_path):
    c = ZOO["llama"]
    pm = get_peft_model(c.build(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                              init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)  # a fine-tuned base embedding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft")  # save_embedding_layers="auto" saves it
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    want = run(pm.eval(), c)
    lm = lora_fx.from_peft(c.build(), tmp_path / "peft", **c.lorafy_kwargs())
    assert rel_err(run(lm, c), want) < 1e-6
    lm.save_pretrained(tmp_path / "ours")
    names = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in names
    assert rel_err(run(PeftModel.from_pretrained(c.build(), tmp_path / "ours").eval(), c), want) < 1e-6
    lm.save_pretrained(tmp_path / "lean", save_embedding_layers=False)
    assert not any("base_layer" in n for n in load_file(tmp_path / "lean" / "adapter_model.safetensors"))


def test_embedding_weights_of_another_vocabulary_are_refused(tmp_path):
    c = ZOO["llama"]
    model = c.build()
    model.resize_token_embeddings(104)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    lm = lora_fx.lorafy(c.build(), "q_proj", **c.lorafy_kwargs())
    with pytest.raises(CheckpointError, match="resize_token_embeddings"):
        lm.load_adapter(tmp_path, "other")
    assert lm.adapters.names == ["default"]


# ---- self.training branches ---------------------------------------------------------------------------------

class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if self.training else y


def test_training_branches_warn_at_trace_and_follow_the_mode_when_exported():
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="self.training-dependent control flow"):
        lora_fx.lorafy(Branchy().eval(), "fc")
    model = Branchy().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm = lora_fx.lorafy(model, "fc", example_inputs=(x,))  # each mode is captured when first run
        lora_fx.lorafy(ZOO["mlp"].build(), "fc1")
    with torch.no_grad():
        assert torch.equal(lm.eval()(x), model.eval()(x))
        assert torch.equal(lm.train()(x), model.train()(x))
        assert torch.equal(lm.eval()(x), model.eval()(x))


def test_hf_models_reading_self_training_for_zero_dropout_do_not_warn():
    c = ZOO["llama"]  # its attention reads self.training to pick a dropout of 0.0 either way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fx.lorafy(c.build(), "q_proj", **c.lorafy_kwargs())
    assert not [w for w in caught if "self.training" in str(w.message)]


def test_falcon_linear_subclass_matches_peft():
    """FalconLinear computes ``x @ self.weight.T``; its blocks hold a lifted constant, so export runs in one piece."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                           vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 8))
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    lm = lora_fx.lorafy(copy.deepcopy(model), Rule(targets, r=4, init=False), example_inputs=(ids,)).eval()
    assert {r["op"] for r in lm.report().rows} == {"aten.matmul (x @ W.T)"} and len(lm.report().rows) == 8
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=targets)).eval()
    with torch.no_grad():
        for key, unit in lm.adapters.units("default").items():
            layer = pm.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)
        assert rel_err(lm(ids).logits, pm(ids).logits) < 1e-6
