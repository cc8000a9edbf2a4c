"""Many adapters in one batch: per-row routing cost against one adapter and against PEFT's mixed batches, and
recompiles of a compiled model under routes, hot swaps and set_adapter.

Setting: tiny Llama (hidden 512, intermediate 1376, 4 layers, vocab 8000), r=16, alpha=32 on all seven
projections, 4 adapters with random nonzero weights (identical in PEFT and lora_fx), rows assigned round-robin.
Timed (eager, no grad, interleaved rounds, medians):

- forward at batch 8 x 128: lora_fx with one adapter (the usual graph), lora_fx routed (4 adapters, one per
  row), PEFT with one adapter, PEFT's mixed batch (``adapter_names``), and the base model with no LoRA (the
  floor no variant can beat);
- decode at batch 8: per-token latency of ``generate`` (32 new tokens after a 16-token prompt:
  ``(t(32) - t(1)) / 31``), the same four variants.

Then, on ``lora_fx.compile(lm)``, after one warm-up call per kind of route: 20 random row assignments, 5 hot
swaps with other ranks and alphas, 5 ``set_adapter`` calls, counting dynamo's captured graphs; outputs are
checked against PEFT (1e-5 relative) along the way.

    python benchmarks/many_adapters.py [--rounds 12]
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch
from common import PROJECTIONS, interleaved, llama, rel_err, report, setting
from peft import LoraConfig, get_peft_model

import lora_fx
from lora_fx import Rule

NAMES = ["a0", "a1", "a2", "a3"]
BATCH, SEQ, PROMPT, NEW = 8, 128, 16, 32


def build(base, device: str):
    ids = torch.randint(0, 8000, (2, 8), device=device)
    lm = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids,),
                        adapter_name="a0").eval()
    for name in NAMES[1:]:
        lm.add_adapter(name, Rule(PROJECTIONS, r=16, alpha=32))
    with torch.no_grad():
        for _, unit in lm.adapters.iter_units():
            torch.nn.init.normal_(unit.lora_B, std=0.02)
    single = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids,),
                            adapter_name="a0").eval()
    single.adapters.load_state_dict({k: v for k, v in lm.adapters.state_dict().items() if k.startswith("a0.")})
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS),
                        adapter_name="a0").eval()
    for name in NAMES[1:]:
        pm.add_adapter(name, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, unit in lm.adapters.iter_units():
            mod = pm.base_model.model.get_submodule(unit.key)
            mod.lora_A[name].weight.copy_(unit.lora_A)
            mod.lora_B[name].weight.copy_(unit.lora_B)
    pm.set_adapter("a0")
    lm.build_adapter_bank()
    return lm, single, pm


def decode_latency(gen) -> float:
    t0 = time.perf_counter()
    gen(1)
    t1 = time.perf_counter()
    gen(NEW)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (NEW - 1)


def timings(lm, single, pm, base, rounds: int, device: str) -> list[dict]:
    names = [NAMES[i % 4] for i in range(BATCH)]
    x = torch.randint(0, 8000, (BATCH, SEQ), device=device)
    with torch.no_grad():
        routed = lm(x, adapter_names=names).logits
        assert rel_err(routed, pm(input_ids=x, adapter_names=names).logits) < 1e-5
        assert rel_err(single(x).logits, pm(input_ids=x).logits) < 1e-5
    forward = {
        "lora_fx one adapter": lambda: single(x),
        "lora_fx routed": lambda: lm(x, adapter_names=names),
        "PEFT one adapter": lambda: pm(input_ids=x),
        "PEFT mixed batch": lambda: pm(input_ids=x, adapter_names=names),
        "base model (floor)": lambda: base(input_ids=x),
    }
    with torch.no_grad():
        f = interleaved(forward, rounds, device)
    prompt = torch.randint(0, 8000, (BATCH, PROMPT), device=device)
    mask = torch.ones_like(prompt)
    gens = {
        "lora_fx one adapter": lambda n: single.generate(prompt, max_new_tokens=n, eos_token_id=[]),
        "lora_fx routed": lambda n: lm.generate(prompt, max_new_tokens=n, adapter_names=names, eos_token_id=[]),
        "PEFT one adapter": lambda n: pm.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n,
                                                  min_new_tokens=n, do_sample=False, pad_token_id=0),
        "PEFT mixed batch": lambda n: pm.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n,
                                                  min_new_tokens=n, do_sample=False, adapter_names=names,
                                                  pad_token_id=0),
    }
    with torch.no_grad():
        assert torch.equal(gens["lora_fx routed"](8), gens["PEFT mixed batch"](8))
        for gen in gens.values():
            gen(2)
        samples: dict[str, list[float]] = {k: [] for k in gens}
        for _ in range(rounds):
            for k, g in gens.items():
                samples[k].append(decode_latency(g))
    d = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    rows = []
    for what, t in (("forward 8x128", f), ("decode 8x1", d)):
        for k, v in t.items():
            rows.append({"measure": what, "variant": k, "ms": v * 1e3, "vs lora_fx one": v / t["lora_fx one adapter"],
                         "vs PEFT mixed": v / t["PEFT mixed batch"]})
    return rows


def recompiles(lm, pm, device: str) -> dict:
    from torch._dynamo.utils import counters

    lora_fx.compile(lm)
    x = torch.randint(0, 8000, (BATCH, 32), device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lm.set_adapter("a0")
        lm(x)
        lm(x, adapter_names=[NAMES[i % 4] for i in range(BATCH)])
        start = counters["stats"]["unique_graphs"]
        worst = 0.0
        for _ in range(20):
            names = [NAMES[i] for i in torch.randint(0, 4, (BATCH,), generator=g)]
            worst = max(worst, rel_err(lm(x, adapter_names=names).logits, pm(input_ids=x, adapter_names=names).logits))
        with tempfile.TemporaryDirectory() as tmp:
            for i, (r, alpha) in enumerate(((4, 8), (16, 4), (8, 64), (12, 12), (2, 1))):
                src = lora_fx.lorafy(llama(device=device), Rule(PROJECTIONS, r=r, alpha=alpha),
                                     example_inputs=(x[:2, :8],), adapter_name="a1")
                for _, unit in src.adapters.iter_units():
                    torch.nn.init.normal_(unit.lora_B, std=0.02)
                src.save_pretrained(f"{tmp}/s{i}")
                lm.load_adapter(f"{tmp}/s{i}/a1", "a1", hotswap=True)
                pm.delete_adapter("a1")
                pm.load_adapter(f"{tmp}/s{i}/a1", "a1")
                names = ["a1", "a0"] * (BATCH // 2)
                worst = max(worst, rel_err(lm(x, adapter_names=names).logits,
                                           pm(input_ids=x, adapter_names=names).logits))
        for name in ("a2", "a0", "a3", "a1", "a2"):
            lm.set_adapter(name)
            pm.set_adapter(name)
            worst = max(worst, rel_err(lm(x).logits, pm(input_ids=x).logits))
        return {"recompiles": counters["stats"]["unique_graphs"] - start, "calls": 30, "max rel err vs PEFT": worst}


def main() -> None:
    args, dtype, size, malloc = setting(12)
    base = llama(**size, dtype=dtype, device=args.device)
    lm, single, pm = build(base, args.device)
    rows = timings(lm, single, pm, base, args.rounds, args.device)
    meta = {"rounds": args.rounds, "steady_malloc": malloc, "batch": BATCH, "seq": SEQ, "adapters": len(NAMES)}
    if not args.no_compile:
        meta["compiled"] = recompiles(lm, pm, args.device)
        print(meta["compiled"])
    report("many_adapters", rows, meta)


if __name__ == "__main__":
    main()
