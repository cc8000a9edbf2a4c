"""First calls: ``lorafy`` and a new argument combination, with the on-disk capture cache off, empty and warm.

Each round runs three fresh processes on the issue's 4-layer tiny Llama (hidden 512), interleaved:
- ``off``  (``LORA_FX_CAPTURE_CACHE=0``): the process's first ``lorafy``; then, in the same (now warm) process,
  ``lorafy`` of a second model, its first call with ``attention_mask`` (a new argument combination) and its first
  ``generate`` (the capture of its one graph);
- ``cold`` (an empty cache folder): the process's first ``lorafy``, which also stores the capture;
- ``warm`` (the folder ``cold`` filled): the same three times as ``off``, every capture read from the cache.
PEFT's ``get_peft_model`` (same targets) is timed in the ``off`` process for reference.

    python benchmarks/first_call.py [--rounds 12]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

TARGETS = ["q_proj", "v_proj"]


def child() -> None:
    from common import llama

    import lora_fx

    torch.set_num_threads(2)
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(0))
    times = {}
    model = llama()
    t0 = time.perf_counter()
    lora_fx.lorafy(model, TARGETS, example_inputs=(ids,))
    times["first lorafy"] = time.perf_counter() - t0
    model = llama(seed=1)
    t0 = time.perf_counter()
    lm = lora_fx.lorafy(model, TARGETS, example_inputs=(ids,))
    times["lorafy, warm process"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm(ids, attention_mask=torch.ones_like(ids))
    times["new argument combination"] = time.perf_counter() - t0
    lm.eval()
    t0 = time.perf_counter()
    lm.generate(ids[:1, :16], max_new_tokens=8)
    times["first generate"] = time.perf_counter() - t0
    from peft import LoraConfig, get_peft_model

    model = llama(seed=2)
    t0 = time.perf_counter()
    get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))
    times["PEFT get_peft_model"] = time.perf_counter() - t0
    print(json.dumps(times))


def run_child(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child"], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    import argparse

    from common import report

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "LORA_FX_CACHE_DIR": folder}
            runs = {"off": run_child({**env, "LORA_FX_CAPTURE_CACHE": "0"}), "cold": run_child(env),
                    "warm": run_child(env)}
        for cache, times in runs.items():
            for what, t in times.items():
                if cache == "cold" and what != "first lorafy" or cache != "off" and what.startswith("PEFT"):
                    continue  # a cold process stores its first capture: later calls would read it
                samples.setdefault((what, cache), []).append(t)
    rows = []
    for (what, cache), ts in samples.items():
        ts = sorted(ts)
        rows.append({"call": what, "capture cache": cache, "median s": ts[len(ts) // 2],
                     "range s": f"{ts[0]:.3f}-{ts[-1]:.3f}"})
    report("first_call", rows, {
        "what": "4-layer tiny Llama (hidden 512), q/v targets, batch 2 x 32; fresh processes, interleaved",
        "rounds": args.rounds,
        "targets": "warm cache: lorafy <= 0.3 s and a new argument combination <= 0.3 s; cold lorafy <= 1.0 s; "
                   "first generate <= 1 s"})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        main()
