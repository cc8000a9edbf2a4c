"""Peak memory of a training step: base model (frozen, floor), PEFT eager, lora_fx eager.

Each variant runs in a fresh process: build and capture, release freed memory to the OS, then sample the
resident set (psutil, every millisecond) over 3 training steps. Reported: the step's peak RSS above the
RSS before the first step, in MiB (activations, gradients, optimizer state, allocator slack).

    python benchmarks/memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from common import steady_malloc, step_peak_mib

VARIANTS = ["base (frozen, floor)", "PEFT eager", "lora_fx eager"]


def child(name: str) -> None:
    from train_step import build

    torch.set_num_threads(2)
    steady = steady_malloc()
    variants, _ = build("cpu", torch.float32, {}, 4, 128, compile_=False)
    step = variants[name]
    del variants
    print(json.dumps({"variant": name, "step_peak_mib": step_peak_mib(step), "steady_malloc": steady}))


def main() -> None:
    from common import report

    rows = []
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    peft = next(r["step_peak_mib"] for r in rows if r["variant"] == "PEFT eager")
    table = [{"variant": r["variant"], "step peak MiB": r["step_peak_mib"], "x PEFT": r["step_peak_mib"] / peft}
             for r in rows]
    report("memory", table, {"target": "lora_fx step peak <= PEFT's"})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
