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
from lora_fx.checkpoint import strip_adapter_name


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

    from lora_fx.merge_dir import merge_model_dir

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


def test_training_mode_capture_warns():
    model = ZOO["gpt2"].build_fn()  # a fresh HF model is in training mode, with dropout
    with pytest.warns(UserWarning, match="training mode"):
        lora_fx.lorafy(model, ["c_attn"], example_inputs=ZOO["gpt2"].inputs())
