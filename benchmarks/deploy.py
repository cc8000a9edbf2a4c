"""AOTInductor packages against torch.compile: the packaged merged forward, the packaged unmerged one, the time to
swap an adapter into a loaded package, and the build times.

Setting (the issue's): tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), r=16, alpha=32 on
all seven projections, random nonzero adapters; shapes 4 x 128 and 1 x 1. Variants: the merged graph under
``lora_fx.compile`` (warmed up), its package, the unmerged LoraModel's package. Every output is checked against
eager (1e-5 relative) before timing. Interleaved rounds, medians and the range over rounds.

    python benchmarks/deploy.py [--rounds 12]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import PROJECTIONS, interleaved_times, llama, rel_err, report, setting

import lora_fx
from lora_fx import Rule


def main() -> None:
    args, _, _, malloc = setting(12)
    base = llama()
    example = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    lm = lora_fx.lorafy(base, Rule(PROJECTIONS, r=16, alpha=32, init=False), example_inputs=(example,)).eval()
    out = Path(tempfile.mkdtemp())
    build = {}
    t0 = time.perf_counter()
    lora_fx.package(lm, out / "unmerged.pt2", example_inputs=(example,))
    build["unmerged package"] = time.perf_counter() - t0
    lm.save_pretrained(out / "adapter")
    shapes = {"4x128": torch.randint(0, 8000, (4, 128)), "1x1": torch.randint(0, 8000, (1, 1))}
    with torch.no_grad():
        eager = {k: lm(ids).logits for k, ids in shapes.items()}
    merged = lm.merge_and_unload()
    t0 = time.perf_counter()
    lora_fx.package(merged, out / "merged.pt2", example_inputs=(example,))
    build["merged package"] = time.perf_counter() - t0
    compiled = lora_fx.compile(merged)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in shapes.values():
            compiled(ids), compiled(ids)
    build["lora_fx.compile (both shapes)"] = time.perf_counter() - t0
    pkg_merged = torch._inductor.aoti_load_package(str(out / "merged.pt2"))
    pkg_unmerged = torch._inductor.aoti_load_package(str(out / "unmerged.pt2"))
    rows = []
    for shape, ids in shapes.items():
        fns = {"compiled merged": lambda ids=ids: compiled(ids), "package merged": lambda ids=ids: pkg_merged(ids),
               "package unmerged": lambda ids=ids: pkg_unmerged(ids)}
        with torch.no_grad():
            for name, fn in fns.items():
                err = rel_err(fn().logits, eager[shape])
                assert err < 1e-5, (name, shape, err)
            times = interleaved_times(fns, args.rounds)
        ref = statistics.median(times["compiled merged"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"shape": shape, "variant": name, "ms": med * 1e3, "x compiled merged": med / ref,
                         "range": f"{min(ts) / ref:.2f}-{max(ts) / ref:.2f}"})
    swaps = []
    for _ in range(5):
        t0 = time.perf_counter()
        lora_fx.swap_adapter(pkg_unmerged, out / "unmerged.pt2", out / "adapter")
        swaps.append(time.perf_counter() - t0)
    rows.append({"shape": "-", "variant": "swap_adapter (median of 5)", "ms": statistics.median(swaps) * 1e3,
                 "x compiled merged": float("nan"), "range": f"{min(swaps) * 1e3:.1f}-{max(swaps) * 1e3:.1f} ms"})
    for name, s in build.items():
        rows.append({"shape": "-", "variant": f"build: {name}", "ms": s * 1e3, "x compiled merged": float("nan"),
                     "range": ""})
    report("deploy", rows, {"rounds": args.rounds, "steady_malloc": malloc,
                            "setting": "tiny Llama hidden 512, 4 layers, r=16 on all projections",
                            "targets": "package merged <= 1.0x compiled merged at 4x128 and 1x1; package unmerged "
                                       "<= 1.08x package merged; swap <= 50 ms, no compile"})


if __name__ == "__main__":
    main()
