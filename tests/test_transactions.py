"""Verbs are transactions: a fault raised at any internal step of a verb (an exception, or a KeyboardInterrupt)
leaves the state, the weights, the trainable flags, the graphs and the outputs exactly as they were, and the
same verb then succeeds."""

import pytest
import torch
from faults import Injected, InjectedInterrupt, calls, fault_at, points
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import Rule


def _mlp():
    torch.manual_seed(0)
    lm = lora_fx.lorafy(ZOO["mlp"].build(), Rule(["fc1", "fc2"], r=4, alpha=8, init=False))
    lm.add_adapter("b", Rule(["fc1", "head"], r=2, alpha=4, init=False))
    return lm


def _llama():
    torch.manual_seed(0)
    c = ZOO["llama"]
    lm = lora_fx.lorafy(c.build(), Rule(["q_proj", "v_proj"], r=4, alpha=8, init=False), **c.lorafy_kwargs())
    lm.add_adapter("b", Rule(["q_proj", "o_proj"], r=2, alpha=4, init=False))
    return lm


def snapshot(lm, inputs) -> dict:
    gm = lm.graph_module
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        out = output_tensor(lm(*inputs)).clone()
    return {
        "state": lm.state,
        "values": {n: t.detach().clone() for n, t in {**params, **buffers}.items()},
        "storage": {n: t.data_ptr() for n, t in params.items()},
        "identity": {n: id(t) for n, t in params.items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "source": {n: p.detach().clone() for n, p in lm.state.captured.source.named_parameters()},
        "names": list(lm.adapters.names), "active": list(lm.adapters.active), "merged": lm.merged_adapters,
        "bank": lm.adapter_bank.slots if lm.adapter_bank is not None else None,
        "code": lm.code, "out": out,
    }


def assert_same(now: dict, before: dict, where: str) -> None:
    assert now["state"] is before["state"], where
    for key in ("storage", "identity", "requires_grad", "names", "active", "merged", "bank", "code"):
        assert now[key] == before[key], f"{key} differs after {where}"
    for group in ("values", "source"):
        assert now[group].keys() == before[group].keys(), where
        for name, t in now[group].items():
            assert torch.equal(t, before[group][name]), f"{name} differs after {where}"
    assert torch.equal(now["out"], before["out"]), where


def _save(lm, path, name, seed):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for unit in lm.adapters.units(name).values():
            unit.lora_B.copy_(torch.randn(unit.lora_B.shape, generator=g))
    lm.save_pretrained(path, selected_adapters=[name])
    return path if name == "default" else path / name


def _verbs(tmp_path):
    """name -> (setup(lm), verb(lm))."""
    def saved(name, seed, to="files"):
        def setup(lm):
            other = _mlp()
            return _save(other, tmp_path / f"{to}_{name}_{seed}", name, seed)
        return setup
    nothing = lambda lm: None  # noqa: E731
    return {
        "merge": (nothing, lambda lm, _: lm.merge(progress=lambda key: None)),
        "merge_no_copy": (nothing, lambda lm, _: lm.merge(["default", "b"], keep_original=False)),
        "unmerge": (lambda lm: lm.merge(), lambda lm, _: lm.unmerge()),
        "add_adapter": (nothing, lambda lm, _: lm.add_adapter("c", Rule(["fc2", "head"], r=2, init=False))),
        "add_pissa": (nothing, lambda lm, _: lm.add_adapter("p", Rule(["fc1"], r=2, init="pissa"))),
        "set_adapter": (nothing, lambda lm, _: lm.set_adapter(["default", "b"])),
        "delete_adapter": (nothing, lambda lm, _: lm.delete_adapter("b")),
        "delete_middle_of_bank": (lambda lm: (lm.add_adapter("c", Rule(["fc2"], r=2, init=False)),
                                              lm.build_adapter_bank()),
                                  lambda lm, _: lm.delete_adapter("b")),
        "load_new": (saved("b", 1), lambda lm, path: lm.load_adapter(path, "c")),
        "load_in_place": (saved("default", 2), lambda lm, path: lm.load_adapter(path, "default")),
        "hot_swap_builds_bank": (saved("b", 3), lambda lm, path: lm.load_adapter(path, "b", hotswap=True)),
        "hot_swap": (lambda lm: (lm.build_adapter_bank(max_rank=4), saved("b", 4)(lm))[1],
                     lambda lm, path: lm.load_adapter(path, "b", hotswap=True)),
        "build_bank": (nothing, lambda lm, _: lm.build_adapter_bank(max_rank=6)),
        "remove_bank": (lambda lm: lm.build_adapter_bank(), lambda lm, _: lm.remove_adapter_bank()),
        "add_to_bank": (lambda lm: lm.build_adapter_bank(),
                        lambda lm, _: lm.add_adapter("c", Rule(["fc2"], r=3, init=False))),
        "weighted": (nothing, lambda lm, _: lm.add_weighted_adapter(["default", "b"], [0.5, 1.0], "mix", "svd")),
    }


VERBS = list(_verbs(None))


@pytest.mark.parametrize("name", VERBS)
def test_a_fault_anywhere_in_a_verb_changes_nothing(name, tmp_path):
    setup, verb = _verbs(tmp_path)[name]
    lm = _mlp()
    arg = setup(lm)
    x = ZOO["mlp"].inputs()
    before = snapshot(lm, x)
    trial = _mlp()
    trial_arg = setup(trial)
    plan = points(calls(lambda: verb(trial, trial_arg)))
    assert len(plan) > 20
    for i, n in enumerate(plan):
        exc = InjectedInterrupt if i % 4 == 3 else Injected
        assert fault_at(n, lambda: verb(lm, arg), exc), f"{name}: no fault at call {n}"
        assert_same(snapshot(lm, x), before, f"{name}, fault at call {n}")
    verb(lm, arg)  # and then it succeeds
    assert lm.state is not before["state"] and lm.state.version > before["state"].version


@pytest.mark.parametrize("name", ["set_adapter", "merge", "add_adapter", "build_bank"])
def test_faults_in_verbs_of_a_model_with_blocks(name):
    verbs = {
        "set_adapter": lambda lm: lm.set_adapter("b"),
        "merge": lambda lm: lm.merge(["default", "b"]),
        "add_adapter": lambda lm: lm.add_adapter("c", Rule(["k_proj", "up_proj"], r=2, init=False)),
        "build_bank": lambda lm: lm.build_adapter_bank(),
    }
    verb = verbs[name]
    lm = _llama()
    x = ZOO["llama"].inputs()
    before = snapshot(lm, x)
    trial = _llama()
    n_calls = len(calls(lambda: verb(trial)))
    for n in sorted({1, *range(1, n_calls, max(1, n_calls // 30)), n_calls}):
        assert fault_at(n, lambda: verb(lm)), f"{name}: no fault at call {n}"
        assert_same(snapshot(lm, x), before, f"{name}, fault at call {n}")
    verb(lm)
    assert lm.state.version > before["state"].version
