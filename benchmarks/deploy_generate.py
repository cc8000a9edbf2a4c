"""Generation packages against ``lora_fx.compile``: per-token decode latency of ``PackagedGenerator`` over a
``package_generation`` package and of ``lm.generate`` compiled, unmerged and merged, and the build times.

Setting: tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), r=16, alpha=32 on all seven
projections, random nonzero adapters; prompt of 32 tokens, 64 new tokens, batch 1 and 4, greedy; one package per
form (128-token cache) serves both batch sizes. Greedy tokens of every variant are checked equal to eager
``lm.generate`` first. Decode latency per token = (time for 64 new tokens - time for 1) / 63; interleaved rounds,
medians, ranges of the per-round ratio to the compiled unmerged variant.

    python benchmarks/deploy_generate.py [--rounds 12]
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import PROJECTIONS, interleaved_times, llama, report, setting

import lora_fx
from lora_fx import Rule

NEW, PROMPT = 64, 32


def main() -> None:
    args, _, _, malloc = setting(12)
    base = llama()
    example = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
    out = Path(tempfile.mkdtemp())
    forms, build = {}, {}
    for form in ("unmerged", "merged"):
        torch.manual_seed(1)
        rule = Rule(PROJECTIONS, r=16, alpha=32, init=False)
        lm = lora_fx.lorafy(copy.deepcopy(base), rule, example_inputs=(example,)).eval()
        if form == "merged":
            lm.merge()
        t0 = time.perf_counter()
        lora_fx.package_generation(lm, out / f"{form}.pt2", max_length=PROMPT + NEW)
        build[f"{form} generation package"] = time.perf_counter() - t0
        packaged = lora_fx.PackagedGenerator(out / f"{form}.pt2")
        eager = {b: lm.generate(_prompt(b), max_new_tokens=NEW, eos_token_id=[]) for b in (1, 4)}
        lora_fx.compile(lm)
        t0 = time.perf_counter()
        for b in (1, 4):
            assert torch.equal(lm.generate(_prompt(b), max_new_tokens=NEW, eos_token_id=[]), eager[b]), form
            assert torch.equal(packaged.generate(_prompt(b), max_new_tokens=NEW, eos_token_id=[]), eager[b]), form
        build[f"lora_fx.compile warm-up ({form}, both batches)"] = time.perf_counter() - t0
        forms[f"lora_fx compiled, {form}"] = lm.generate
        forms[f"package, {form}"] = packaged.generate
    rows = []
    for batch in (1, 4):
        ids = _prompt(batch)
        fns = {}
        for name, gen in forms.items():
            fns[f"{name}|{NEW}"] = lambda g=gen, x=ids: g(x, max_new_tokens=NEW, eos_token_id=[])
            fns[f"{name}|1"] = lambda g=gen, x=ids: g(x, max_new_tokens=1, eos_token_id=[])
        times = interleaved_times(fns, args.rounds)
        per_token = {name: [(a - b) / (NEW - 1) for a, b in zip(times[f"{name}|{NEW}"], times[f"{name}|1"])]
                     for name in forms}
        ref = per_token["lora_fx compiled, unmerged"]
        for name, ts in per_token.items():
            ratios = sorted(t / r for t, r in zip(ts, ref))
            rows.append({"batch": batch, "variant": name, "decode ms/token": statistics.median(ts) * 1e3,
                         "x compiled unmerged": statistics.median(ratios),
                         "range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}"})
    for name, s in build.items():
        rows.append({"batch": "-", "variant": f"build: {name}", "decode ms/token": s * 1e3,
                     "x compiled unmerged": float("nan"), "range": ""})
    report("deploy_generate", rows, {
        "rounds": args.rounds, "steady_malloc": malloc, "new_tokens": NEW, "prompt": PROMPT,
        "setting": "tiny Llama hidden 512, 4 layers, r=16 on all projections, greedy",
        "target": "packaged decode step <= 1.0x compiled decode (issue #28)"})


def _prompt(batch: int) -> torch.Tensor:
    return torch.randint(1, 8000, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


if __name__ == "__main__":
    main()
