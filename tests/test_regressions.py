"""Regressions found in review: autocast with the fused op, unmerging a tied get_attr weight, adapter names
that prefix tensor names, mixed-dtype adapters, sharded merge directories, training-mode capture."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from zoo import MLP, ZOO

import lora_fx
from lora_fx import Rule
from lora_fx.peft.checkpoint import strip_adapter_name


def test_fused_op_under_autocast():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 12)
    fused = lora_fx.lorafy(model, Rule(["fc1", "fc2"], init=False))
    plain = lora_fx.lorafy(MLP(), Rule(["fc1", "fc2"]), fuse=False)
    plain.graph_module.load_state_dict(fused.graph_module.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        out.float().sum().backward()
        with torch.no_grad():
            ref = plain(x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref.float()) < 1e-2


def test_unmerge_tied_weight_read_through_get_attr():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 10, bias=False)
            self.wte = self.head.weight

        def forward(self, i):
            return self.head(F.embedding(i, self.wte))

    torch.manual_seed(0)
    model, i = Tied(), torch.randint(0, 10, (2, 5))
    lm = lora_fx.lorafy(model, Rule("wte", init=False))
    before = lm(i).detach()
    lm.merge()
    assert rel_err(lm(i).detach(), before) < 1e-6
    lm.unmerge()
    assert torch.equal(lm(i).detach(), before) and model.wte is model.head.weight


@pytest.mark.parametrize("name", ["w", "wei", "default"])
def test_adapter_names_that_prefix_tensor_names(name):
    t = {f"base_model.model.fc.lora_A.{name}.weight": 1, "base_model.model.fc.lora_A.weight": 2,
         f"base_model.model.e.lora_embedding_A.{name}": 3}
    out = strip_adapter_name(t, name)
    assert set(out) == {"base_model.model.fc.lora_A.weight", "base_model.model.e.lora_embedding_A"}


def test_mixed_dtype_adapters_keep_the_layer_dtype():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    lm = lora_fx.lorafy(model, Rule(["fc1"], init=False), autocast_adapter_dtype=False)
    lm.add_adapter("f32", Rule(["fc1"], init=False))  # float32 adapter on a bf16 layer
    lm.set_adapter(["default", "f32"])
    assert lm(torch.randn(2, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_merge_dir_does_not_copy_base_weight_shards(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_fx.deploy.merge_dir import merge_model_dir

    c = ZOO["llama"]
    c.build().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert any("-of-" in p.name for p in (tmp_path / "base").iterdir())
    get_peft_model(c.build(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    merge_model_dir(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    saved = [n for n in names if n.endswith(".safetensors")]
    assert saved
    index = tmp_path / "out" / "model.safetensors.index.json"
    if index.exists():  # every shard listed by the merged index, and no other shard
        import json
        listed = set(json.loads(index.read_text())["weight_map"].values())
        assert listed == set(saved)
    else:
        assert saved == ["model.safetensors"]
    assert (tmp_path / "out").stat().st_mode & 0o077  # not left 0700


class BNHead(nn.Module):
    """A BatchNorm (buffers) to save whole, and a parameter whose name contains 'bias' without being one."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.pos_bias = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc1(x))) + self.pos_bias)


def _bn_build():
    torch.manual_seed(0)
    return BNHead().eval()


def test_modules_to_save_buffers_round_trip_with_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = dict(target_modules=["fc1"], modules_to_save=["bn"], init_lora_weights=False)
    pm = get_peft_model(_bn_build(), LoraConfig(**cfg))
    pm.train()
    for _ in range(3):  # the copy's running statistics move
        pm(torch.randn(16, 6) * 3 + 1)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randn(5, 6)
    lm = lora_fx.from_peft(_bn_build(), tmp_path / "peft")
    assert rel_err(lm(x).detach(), pm(x).detach()) < 1e-6
    lm.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(_bn_build(), tmp_path / "ours").eval()
    assert rel_err(back(x).detach(), lm(x).detach()) < 1e-6
    ref = lm(x).detach()
    gm = lm.merge_and_unload()  # trained running statistics come along
    assert rel_err(gm(x).detach(), ref) < 1e-6


def test_deleting_an_active_adapter_with_saved_modules():
    lm = lora_fx.lorafy(_bn_build(), lora_fx.RuleSet([Rule(["fc1"])], modules_to_save=("head",)))
    lm.add_adapter("b", Rule(["fc1"]))
    lm.set_adapter("b")
    lm.set_adapter("default")
    lm.delete_adapter("default")
    assert "saved" not in lm.code and lm(torch.randn(2, 6)).shape == (2, 3)


def test_two_active_adapters_saving_one_module_are_refused():
    lm = lora_fx.lorafy(_bn_build(), lora_fx.RuleSet([Rule(["fc1"])], modules_to_save=("head",)))
    lm.add_adapter("b", lora_fx.RuleSet([Rule(["fc1"])], modules_to_save=("head",)))
    with pytest.raises(lora_fx.AdapterError, match="same module"):
        lm.set_adapter(["default", "b"])


def test_tied_lm_head_saved_whole_keeps_the_embedding():
    from peft import LoraConfig, get_peft_model

    c = ZOO["gpt2"]
    cfg = dict(target_modules=["c_attn"], modules_to_save=["lm_head"], init_lora_weights=False)
    torch.manual_seed(3)
    pm = get_peft_model(c.build(), LoraConfig(**cfg)).eval()
    lm = lora_fx.lorafy(c.build(), LoraConfig(**cfg), example_inputs=c.inputs())
    lm.adapters.load_state_dict({k: v for k, v in lm.adapters.state_dict().items()})
    with torch.no_grad():
        for key, unit in lm.adapters.units("default").items():
            mod = pm.base_model.model.get_submodule(key)
            mod.lora_A["default"].weight.copy_(unit.lora_A)
            mod.lora_B["default"].weight.copy_(unit.lora_B)
        for copy_ in (pm.base_model.model.lm_head.modules_to_save["default"].weight,
                      lm.adapters.saved("default")["lm_head"][1].weight):
            copy_.mul_(1.5)  # a trained head, the embedding untouched
        x = c.inputs()
        assert rel_err(lm(*x).logits, pm(*x).logits) < 1e-6


def test_failed_pissa_load_restores_the_base_weights(tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    c = ZOO["mlp"]
    lora_fx.lorafy(c.build(), LoraConfig(target_modules=["fc1"], init_lora_weights="pissa", r=4)).save_pretrained(
        tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = c.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm = lora_fx.lorafy(model, Rule(["fc2"]))
    with pytest.raises(lora_fx.CheckpointError):
        lm.load_adapter(tmp_path, "other")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_weight_rewriting_init_refused_when_merged_or_on_conv1d():
    c = ZOO["mlp"]
    lm = lora_fx.lorafy(c.build(), Rule(["fc1"], init=False))
    lm.merge()
    with pytest.raises(lora_fx.MergeError, match="unmerge"):
        lm.add_adapter("p", Rule(["fc2"], init="pissa"))
    g = ZOO["gpt2"]
    with pytest.raises(lora_fx.RuleError, match="olora"):
        lora_fx.lorafy(g.build(), Rule(["c_proj"], init="olora"), example_inputs=g.inputs())


def test_bias_all_takes_parameters_named_bias_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(_bn_build(), LoraConfig(target_modules=["fc1"], bias="all")).save_pretrained(tmp_path)
    lm = lora_fx.from_peft(_bn_build(), tmp_path)
    names = set(lm.bias_parameters("default"))
    assert "base_model.model.pos_bias" not in names and "base_model.model.bn.bias" in names


def test_an_encoder_decoder_is_captured_without_its_decoders_cache():
    """T5's decoder keeps its own copy of the config: capture turns every config's use_cache off, so a call with
    labels captures (no EncoderDecoderCache in the output) and gives the model's own loss."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    src, tgt = torch.randint(0, 96, (2, 7)), torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        want = model(src, labels=tgt, use_cache=False).loss

    def flags():
        return [getattr(m.config, "use_cache", None) for m in model.modules() if hasattr(m, "config")]
    before = flags()
    lm = lora_fx.lorafy(model, ["q", "v"], example_inputs=(src,), example_kwargs={"labels": tgt})
    with torch.no_grad():
        assert torch.allclose(lm(src, labels=tgt).loss, want)
    assert flags() == before and True in before  # put back as they were


def test_generate_on_an_encoder_decoder_runs_the_adapters():
    """lm.generate on T5 (once refused, naming merge as the remedy) runs the model's own generate with the adapters:
    the tokens a merged model generates."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    src, tgt = torch.randint(0, 96, (2, 7)), torch.randint(0, 96, (2, 5))
    lm = lora_fx.lorafy(model, Rule(["q", "v"], init=False), example_inputs=(src,), example_kwargs={"labels": tgt})
    ours = lm.generate(src, max_new_tokens=3)
    with torch.no_grad():
        adapted = lm(src, labels=tgt).logits
        base = model(src, labels=tgt, use_cache=False).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    lm.merge()  # the model's own forward (and so its generate) now sees the adapter
    with torch.no_grad():
        assert torch.allclose(model(src, labels=tgt, use_cache=False).logits, adapted, atol=1e-5)
        assert torch.equal(model.generate(src, max_new_tokens=3, do_sample=False), ours)
