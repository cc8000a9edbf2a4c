"""Compile time of a training step (forward + backward), cold and warm, PEFT vs lora_fx, at 4 and 16 layers.

PEFT: ``torch.compile`` of the whole model; lora_fx: ``lora_fx.compile`` (regional: each block program compiled
once and reused by every block). Cold: a fresh process with an empty TORCHINDUCTOR_CACHE_DIR; warm: a second
fresh process reusing that cache. Measured: wall time of the first two training steps (compilation included)
minus two steady steps.

    python benchmarks/compile_time.py [--layers 4 16]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = {"PEFT compiled": "PEFT eager", "lora_fx compiled": "lora_fx eager"}


def child(name: str, layers: int) -> None:
    from train_step import build, step_fn

    import lora_fx

    torch.set_num_threads(2)
    variants, _ = build("cpu", torch.float32, {"layers": layers}, 4, 128, compile_=False)
    eager = variants[VARIANTS[name]]
    model, params = eager.model, eager.params
    step = step_fn(lora_fx.compile(model), eager.ids, params)
    t0 = time.perf_counter()
    step(), step()
    first_two = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(), step()
    steady_two = time.perf_counter() - t0
    print(json.dumps({"variant": name, "compile_s": first_two - steady_two}))


def main() -> None:
    import argparse

    from common import report

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    args = p.parse_args()
    rows = []
    for layers in args.layers:
        for name in VARIANTS:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                times = []
                for _ in ("cold", "warm"):
                    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", name, str(layers)],
                                         capture_output=True, text=True, env=env, check=True).stdout
                    times.append(json.loads(out.strip().splitlines()[-1])["compile_s"])
            rows.append({"layers": layers, "variant": name, "cold s": times[0], "warm s": times[1]})
    report("compile_time", rows, {"what": "train step (forward + backward) compile; PEFT whole-model "
                                          "torch.compile, lora_fx regional (lora_fx.compile)",
                                  "target": "lora_fx <= PEFT cold and warm, at 4 and 16 layers"})


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
