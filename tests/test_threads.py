"""Calls from several threads: routes travel with each call, generation runs the graphs of one committed state
while another thread switches adapters, and captures are serialised."""

import threading

import torch
from zoo import ZOO, output_tensor

import lora_fx
from lora_fx import Rule


def _run_threads(*fns):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)
        return run
    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def _two(c):
    torch.manual_seed(0)
    lm = lora_fx.lorafy(c.build(), Rule(c.targets, r=4, alpha=8, init=False), **c.lorafy_kwargs())
    lm.add_adapter("b", Rule(c.targets[:2], r=8, alpha=4, init=False))
    return lm


def test_routed_calls_in_two_threads_each_get_their_own_rows():
    c = ZOO["mlp"]
    lm = _two(c)
    x = c.inputs()[0]
    routes = (["default", "b", "__base__", "b"], ["b", "__base__", "default", "default"])
    with torch.no_grad():
        want = [output_tensor(lm(x, adapter_names=list(r))) for r in routes]
    wrong = [0, 0]

    def caller(i):
        def run():
            for _ in range(50):
                with torch.no_grad():
                    got = output_tensor(lm(x, adapter_names=list(routes[i])))
                wrong[i] += not torch.equal(got, want[i])
        return run
    _run_threads(caller(0), caller(1))
    assert wrong == [0, 0]


def test_generate_racing_set_adapter_uses_one_adapter_throughout():
    c = ZOO["llama"]
    lm = _two(c)
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    want = {}
    for name in ("default", "b"):
        lm.set_adapter(name)
        want[name] = lm.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert not torch.equal(want["default"], want["b"])
    results, stop = [], threading.Event()

    def generating():
        for _ in range(8):
            results.append(lm.generate(ids, max_new_tokens=10, eos_token_id=[]))
        stop.set()

    def switching():
        i = 0
        while not stop.is_set():
            lm.set_adapter(("default", "b")[i % 2])
            i += 1
    _run_threads(generating, switching)
    assert len(results) == 8
    assert all(torch.equal(r, want["default"]) or torch.equal(r, want["b"]) for r in results)


def test_concurrent_captures_are_serialised_and_correct():
    cases = [ZOO["llama"], ZOO["qwen2"], ZOO["gpt2"]]
    models = [c.build() for c in cases]
    with torch.no_grad():
        want = [output_tensor(m(*c.inputs())) for m, c in zip(models, cases)]
    got = [None] * len(cases)

    def lorafying(i):
        def run():
            c = cases[i]
            lm = lora_fx.lorafy(models[i], Rule(c.targets, r=2), **c.lorafy_kwargs())
            with torch.no_grad():
                got[i] = output_tensor(lm(*c.inputs()))
        return run
    _run_threads(*(lorafying(i) for i in range(len(cases))))
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # B = 0: the base model's outputs


def test_two_threads_calling_a_new_signature_capture_it_once():
    c = ZOO["llama"]
    lm = _two(c)
    ids = c.inputs()[0]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = lm(ids).logits
    outs = []

    def calling():
        with torch.no_grad():
            outs.append(lm(input_ids=ids, attention_mask=mask).logits)
    _run_threads(calling, calling)
    assert len(lm.derived_graphs) == 1 and all(torch.allclose(o, want, atol=1e-6) for o in outs)


def test_a_deep_copy_has_its_own_state_lock_and_graphs():
    import copy

    c = ZOO["llama"]
    lm = _two(c)
    ids = c.inputs()[0]
    lm.generate(ids[:1], max_new_tokens=2, eos_token_id=[])
    other = copy.deepcopy(lm)
    assert other.state is not lm.state and other.state.store is other.adapters
    with torch.no_grad():
        assert torch.equal(other(ids).logits, lm(ids).logits)
    other.set_adapter("b")
    other.add_adapter("c", Rule(["q_proj"], r=2))
    assert lm.active_adapters == ["default"] and lm.adapters.names == ["default", "b"]
    assert torch.equal(other.generate(ids[:1], max_new_tokens=3, eos_token_id=[]),
                       _generate_with(lm, "b", ids[:1]))


def _generate_with(lm, name, ids):
    lm.set_adapter(name)
    return lm.generate(ids, max_new_tokens=3, eos_token_id=[])
