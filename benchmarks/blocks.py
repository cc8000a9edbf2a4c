"""Block-structured graphs: what capture and rebuilds cost as depth grows, and what gradient checkpointing saves.

Part 1, rebuilds: tiny Llama (hidden 64, intermediate 128, 4 heads / 2 KV heads), all seven projections, r=8, at
32 and 64 layers: ``lorafy`` (capture included; PEFT's ``get_peft_model`` for scale), then ``set_adapter``,
``merge`` and ``unmerge``, each in interleaved rounds (medians; ranges over rounds in the JSON).
Part 2, memory: peak live tensor memory of one training step (forward + backward + AdamW), from every allocation
torch.profiler records, tiny Llama hidden 128, 4 layers, batch 8 x 384, r=8 on q/v: lora_fx and PEFT, each
without and with gradient checkpointing (lora_fx: per block; PEFT: Hugging Face's, non-reentrant).

    python benchmarks/blocks.py [--rounds 12] [--lorafy-rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from common import PROJECTIONS, live_peak_mib, llama, report

import lora_fx
from lora_fx import Rule

MEMORY_VARIANTS = ["PEFT", "PEFT + HF checkpointing", "lora_fx", "lora_fx + checkpointing"]


def _deep(layers: int):
    return llama(hidden=64, intermediate=128, layers=layers, heads=4, vocab=100)


def rebuilds(rounds: int, lorafy_rounds: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 100, (2, 16))
    rule = Rule(PROJECTIONS, r=8, alpha=16)
    times: dict[tuple, list[float]] = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(key, []).append(time.perf_counter() - t0)
        return out

    models = {n: _deep(n) for n in (32, 64)}
    lms = {}
    for _ in range(lorafy_rounds):
        for n, model in models.items():
            fresh, other = copy.deepcopy(model), copy.deepcopy(model)
            lms[n] = timed((n, "lorafy (capture included)"),
                           lambda m=fresh: lora_fx.lorafy(m, rule, example_inputs=(ids,)))
            timed((n, "PEFT get_peft_model"),
                  lambda m=other: get_peft_model(m, LoraConfig(r=8, target_modules=PROJECTIONS)))
    for lm in lms.values():
        lm.add_adapter("other", Rule(["q_proj", "v_proj"], r=4))
    for _ in range(rounds):
        for n, lm in lms.items():
            timed((n, "set_adapter"), lambda lm=lm: lm.set_adapter("other"))
            lm.set_adapter("default")
            timed((n, "merge"), lm.merge)
            timed((n, "unmerge"), lm.unmerge)
    rows = []
    for verb in ("lorafy (capture included)", "PEFT get_peft_model", "set_adapter", "merge", "unmerge"):
        m32, m64 = statistics.median(times[(32, verb)]), statistics.median(times[(64, verb)])
        rows.append({"verb": verb, "32 layers s": m32, "64 layers s": m64, "64 / 32": m64 / m32,
                     "64 layers range": f"{min(times[(64, verb)]):.3f}-{max(times[(64, verb)]):.3f}"})
    return rows


def memory_variant(name: str) -> float:
    from peft import LoraConfig, get_peft_model

    base = llama(hidden=128, intermediate=344, layers=4, heads=4, vocab=8000)
    ids = torch.randint(0, 8000, (8, 384), generator=torch.Generator().manual_seed(0))
    if name.startswith("PEFT"):
        if "checkpointing" in name:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
    else:
        model = lora_fx.lorafy(base, Rule(["q_proj", "v_proj"], r=8, alpha=16), example_inputs=(ids[:2, :8],))
        if "checkpointing" in name:
            model.gradient_checkpointing_enable()
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists before measuring, for both
    return live_peak_mib(step)


def memory() -> list[dict]:
    peaks = {name: memory_variant(name) for name in MEMORY_VARIANTS}
    return [{"variant": name, "step peak MiB": peak,
             "x PEFT (same checkpointing)": peak / peaks["PEFT + HF checkpointing" if "checkpointing" in name
                                                         else "PEFT"]} for name, peak in peaks.items()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--lorafy-rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = rebuilds(args.rounds, args.lorafy_rounds)
    report("blocks_rebuild", rows, {"rounds": args.rounds, "lorafy_rounds": args.lorafy_rounds,
                                    "targets": "64 layers: lorafy <= 5 s; set_adapter, merge, unmerge <= 0.5 s; "
                                               "64 layers <= 2.2x 32 layers"})
    gc.collect()
    report("blocks_memory", memory(), {"setting": "hidden 128, 4 layers, batch 8 x 384, r=8 on q/v",
                                       "measure": "peak live tensor bytes of a step (torch.profiler)",
                                       "targets": "lora_fx <= PEFT, with and without checkpointing"})


if __name__ == "__main__":
    main()
