"""The adapter bank: per-row adapters through the zoo, PEFT's mixed batches and generate, training on a mixed
batch, hot swap with no recompile, and the errors that leave everything as it was."""

import pytest
import torch
from helpers import rel_err, run
from peft import LoraConfig, get_peft_model
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import AdapterError, MergeError, Rule


def _two(c, **kw):
    """Adapters "default" (all targets, r=4) and "b" (the first targets, r=8, another alpha), random B's."""
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, alpha=8, init=False), **c.lorafy_kwargs(), **kw)
    lm.add_adapter("b", Rule(c.targets[:2], r=8, alpha=4, init=False))
    return lm


def test_each_row_gets_its_own_adapter_across_the_zoo(case):
    lm = _two(case)
    x = case.inputs()
    n = len(x[0])
    alone = {}
    for name in ("default", "b"):
        lm.set_adapter(name)
        alone[name] = run(lm, case, x)
    names = (["default", "b", "__base__", "b"] * 2)[:n]
    with torch.no_grad():
        mixed = output_tensor(lm(*x, adapter_names=names))
        lm.set_adapter("b")
        assert torch.allclose(output_tensor(lm(*x)), alone["b"], rtol=1e-5, atol=1e-6)  # default route: active
    assert lm.adapter_bank is not None
    plain = lora_fx.lorafy(case.build(), Rule(case.targets, r=4), **case.lorafy_kwargs())  # B = 0: the base model
    base = run(plain, case, x)
    for i, name in enumerate(names):
        want = base[i] if name == "__base__" else alone[name][i]
        assert rel_err(mixed[i], want) < 1e-5, (i, name)
    assert rel_err(mixed[0], base[0]) > 1e-3  # the adapters matter


def _peft_pair(c, lm):
    ff = c.fan_in_fan_out
    pm = get_peft_model(c.build(), LoraConfig(target_modules=c.targets, r=4, lora_alpha=8, fan_in_fan_out=ff))
    pm.add_adapter("b", LoraConfig(target_modules=c.targets[:2], r=8, lora_alpha=4, fan_in_fan_out=ff))
    with torch.no_grad():
        for name, unit in lm.adapters.iter_units():
            mod = pm.base_model.model.get_submodule(unit.key)
            mod.lora_A[name].weight.copy_(unit.lora_A[:unit.r])
            mod.lora_B[name].weight.copy_(unit.lora_B[:, :unit.r])
    return pm.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mixed_batch_forward_and_generate_equal_peft(name):
    c = ZOO[name]
    lm = _two(c)
    pm = _peft_pair(c, lm)
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(3))
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        ours = lm(ids, adapter_names=names).logits
        theirs = pm(input_ids=ids, adapter_names=names).logits
    assert rel_err(ours, theirs) < 1e-5
    mine = lm.generate(ids, max_new_tokens=12, adapter_names=names, pad_token_id=0)
    peft = pm.generate(input_ids=ids, max_new_tokens=12, do_sample=False, adapter_names=names, pad_token_id=0)
    assert torch.equal(mine, peft)


def test_training_a_mixed_batch_sends_each_rows_gradient_to_its_adapter():
    c = ZOO["mlp"]
    lm = _two(c)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    names = ["default", "b", "b", "__base__", "default", "b"]
    want = {}
    for name in ("default", "b"):
        lm.set_adapter(name)
        rows = [i for i, n in enumerate(names) if n == name]
        lm(x[rows]).pow(2).sum().backward()
        want[name] = {u.key: (u.lora_A.grad.clone(), u.lora_B.grad.clone()) for u in lm.adapters.units(name).values()}
        lm.zero_grad(set_to_none=True)
    lm.build_adapter_bank()
    lm.train()
    lm(x, adapter_names=names).pow(2).sum().backward()
    for name, grads in want.items():
        for key, (ga, gb) in grads.items():
            u = lm.unit(key, name)
            assert rel_err(u.lora_A.grad[:u.r], ga) < 1e-5 and rel_err(u.lora_B.grad[:, :u.r], gb) < 1e-5
            assert not u.lora_A.grad[u.r:].any()  # the padding stays zero
    opt = torch.optim.SGD(lm.parameters(), lr=0.5)
    before = lm(x, adapter_names=names).detach()
    opt.step()  # the step writes the bank in place: the graph sees it
    assert not torch.equal(lm(x, adapter_names=names).detach(), before)


def _saved(tmp_path, c, name, r, alpha, targets, seed):
    torch.manual_seed(seed)
    other = lora_fx.lorafy(c.build(), Rule(targets, r=r, alpha=alpha, init=False), **c.lorafy_kwargs())
    other.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_hot_swaps_and_routes_do_not_recompile_and_equal_peft(tmp_path):
    from torch._dynamo.utils import counters

    c = ZOO["llama"]
    lm = _two(c)
    lm.build_adapter_bank(max_rank=16)
    lora_fx.compile(lm)
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        lm(ids, adapter_names=["b", "default", "__base__", "b"])
        lm(ids)
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(6):
            lm(ids, adapter_names=[["default", "b", "__base__"][i] for i in torch.randint(0, 3, (4,), generator=g)])
        for i, (r, alpha) in enumerate(((2, 5), (16, 3), (8, 16))):
            path = _saved(tmp_path, c, f"s{i}", r, alpha, c.targets[:2] if i else c.targets[:1], seed=i)
            lm.load_adapter(path, "b", hotswap=True)
            lm.set_adapter(["b", "default"][i % 2])
            lm(ids)
            out = lm(ids, adapter_names=["b"] * 4).logits
            pm = get_peft_model(c.build(), LoraConfig.from_pretrained(path)).eval()
            pm.load_adapter(path, "default")
            assert rel_err(out, pm(input_ids=ids).logits) < 1e-5
        assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled


def test_hot_swap_errors_change_nothing(tmp_path):
    c = ZOO["llama"]
    lm = _two(c)
    lm.build_adapter_bank(max_rank=8)
    ids = c.inputs()[0]
    with torch.no_grad():
        before = lm(ids, adapter_names=["b", "default"]).logits
    with pytest.raises(AdapterError, match="exceeds the adapter bank's maximum rank 8"):
        lm.load_adapter(_saved(tmp_path, c, "big", 16, 16, c.targets[:1], 0), "b", hotswap=True)
    with pytest.raises(AdapterError, match="outside this adapter's slots"):
        lm.load_adapter(_saved(tmp_path, c, "wide", 4, 4, c.targets, 0), "b", hotswap=True)
    with pytest.raises(AdapterError, match="no adapter 'nope'"):
        lm.load_adapter(tmp_path / "big", "nope", hotswap=True)
    with torch.no_grad():
        assert torch.equal(lm(ids, adapter_names=["b", "default"]).logits, before)


def test_bank_lifecycle_save_remove_merge_and_dtype(tmp_path):
    c = ZOO["llama"]
    lm = _two(c)
    ids = c.inputs()[0]
    with torch.no_grad():
        want = lm(ids).logits
    lm.build_adapter_bank(max_rank=12)
    assert lm.unit("model.layers.0.self_attn.q_proj", "b").lora_A.shape[0] == 12
    lm.save_pretrained(tmp_path)  # true ranks, loadable by PEFT
    pm = get_peft_model(c.build(), LoraConfig.from_pretrained(tmp_path)).eval()
    pm.load_adapter(tmp_path, "default")
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids).logits, want) < 1e-5
    with pytest.raises(MergeError, match="remove_adapter_bank"):
        lm.merge()
    lm.add_adapter("c", Rule(["q_proj"], r=2))  # a new slot: the bank is rebuilt
    assert lm.adapter_bank.slots == ["default", "b", "c"]
    lm.remove_adapter_bank()
    assert lm.unit("model.layers.0.self_attn.q_proj", "b").lora_A.shape[0] == 8
    other = _two(c)
    other.build_adapter_bank()
    for name in ("b", "default"):
        other.delete_adapter(name)  # the last one takes the bank with it
    assert other.adapter_bank is None
    with torch.no_grad():
        assert rel_err(lm(ids).logits, want) < 1e-6
    lm.merge()


def test_a_dtype_change_keeps_units_and_bank_linked():
    c = ZOO["mlp"]
    lm = _two(c)
    x = c.inputs()[0]
    lm.build_adapter_bank()
    with torch.no_grad():
        want = lm(x, adapter_names=["b", "default", "__base__", "b"])
    lm.to(torch.float64)
    unit = lm.unit("fc1", "b")
    with torch.no_grad():
        unit.lora_B.zero_()  # written through the unit: the bank sees it
        got = lm(x.double(), adapter_names=["b", "default", "__base__", "b"])
    assert rel_err(got[1], want[1].double()) < 1e-6 and rel_err(got[0], want[0].double()) > 1e-4


def test_routing_errors_name_the_fix():
    c = ZOO["mlp"]
    lm = _two(c)
    x = c.inputs()[0]
    with pytest.raises(AdapterError, match="not in the adapter bank"):
        lm(x, adapter_names=["default", "zzz", "b", "b"])
    with pytest.raises(AdapterError, match="rows"):
        lm(x, adapter_names=["default", "b", "b"])
    assert lm.adapter_bank is None  # a refused routed call changes nothing
    with pytest.raises(AdapterError, match="a list"):
        lm(x, adapter_names="b")
    lm.build_adapter_bank()
    lm.set_adapter(["default", "b"])
    with pytest.raises(AdapterError, match="pass adapter_names"):
        lm(x)
    with pytest.raises(AdapterError, match="DoRA"):
        lm.add_adapter("d", Rule(["fc1"], r=2, use_dora=True))
    assert lm.adapters.names == ["default", "b"]
    lm.set_adapter("b")
    with torch.no_grad():
        assert rel_err(lm(x), lm(x, adapter_names=["b"] * 4)) < 1e-6
    dora = lora_fx.lorafy(c.build(), Rule(["fc1"], r=2, use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        dora.build_adapter_bank()
    assert dora.adapter_bank is None and dora.unit("fc1").lora_A.shape[0] == 2
