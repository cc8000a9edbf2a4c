"""Compile time of a training step (torch.compile, forward + backward), cold and warm, PEFT vs lora_fx.

Cold: a fresh process with an empty TORCHINDUCTOR_CACHE_DIR; warm: a second fresh process reusing that cache.
Measured: wall time of the first two training steps (compilation included) minus two steady steps.

    python benchmarks/compile_time.py
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


def child(name: str) -> None:
    from train_step import build, step_fn

    import lora_fx

    torch.set_num_threads(2)
    variants, _ = build("cpu", torch.float32, {}, 4, 128, compile_=False)
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
    from common import report

    rows = []
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            times = []
            for _ in ("cold", "warm"):
                out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                     env=env, check=True).stdout
                times.append(json.loads(out.strip().splitlines()[-1])["compile_s"])
        rows.append({"variant": name, "cold s": times[0], "warm s": times[1]})
    report("compile_time", rows, {"what": "train step (forward + backward) compile, torch.compile defaults"})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
