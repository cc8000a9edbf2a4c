"""Training in the ecosystem: Hugging Face Trainer step time (lora_fx vs PEFT), and FSDP2 vs DDP memory per rank.

Part 1: tiny Llama (hidden 512, intermediate 1376, 4 layers, vocab 8000), r=16, alpha=32 on all seven
projections, batch 4 x 128 with labels, ``TrainingArguments`` defaults (AdamW, linear schedule, grad clipping).
Each round runs a short ``trainer.train()`` per variant, interleaved; a callback times every step but the
first of each run; medians over all timed steps.
Part 2: the same model at 16 layers on 2 CPU ranks (gloo), batch 2 x 128 per rank, for
``DistributedDataParallel(lm)`` and ``lora_fx.fully_shard(lm)`` (per block, then the root): per rank, the tensor
memory held between steps (every live storage once: weights or their shards, adapters, optimizer state) plus the
peak of a training step above it (every allocation torch.profiler records). Exact, unlike the resident set,
which on CPU mostly shows how glibc keeps freed all-gather buffers.

    python benchmarks/ecosystem.py [--rounds 12]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from common import PROJECTIONS, llama, report, steady_malloc

import lora_fx


def trainer_steps(rounds: int) -> list[dict]:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    base = llama()
    rows = torch.randint(0, 8000, (64, 128), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    config = LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)
    torch.manual_seed(0)
    models = {"PEFT": get_peft_model(copy.deepcopy(base), config)}
    torch.manual_seed(0)
    models["lora_fx"] = lora_fx.lorafy(copy.deepcopy(base), config, example_inputs=(torch.tensor(rows[:2]),))
    times: dict[str, list[float]] = {name: [] for name in models}

    class Timer(TrainerCallback):
        def __init__(self, name):
            self.name, self.t0, self.step = name, 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step += 1
            if self.step > 1:  # the first step of each run warms up
                times[self.name].append(time.perf_counter() - self.t0)

    out = tempfile.mkdtemp()
    for r in range(rounds + 1):
        for name, model in models.items():
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=4, report_to=[],
                                     use_cpu=True, save_strategy="no", logging_strategy="no", seed=r)
            Trainer(model=model, args=args, train_dataset=ds, callbacks=[Timer(name)]).train()
            if r == 0:
                times[name].clear()  # round 0: warm-up (lazy capture of the labels signature, caches)
    peft = statistics.median(times["PEFT"])
    return [{"variant": name, "step ms": statistics.median(ts) * 1e3,
             "range ms": f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}", "x PEFT": statistics.median(ts) / peft}
            for name, ts in times.items()]


def live_tensor_mib() -> float:
    """Bytes of every real tensor storage alive in this process (parameters, shards, buffers, optimizer state),
    each storage once."""
    from torch._subclasses.fake_tensor import FakeTensor

    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or isinstance(obj, FakeTensor) or obj.device.type == "meta":
            continue
        try:
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses (DTensor): their local tensor counts
            continue
        if ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total / 2**20


def memory_worker(rank: int, mode: str, init: str, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from blocks import step_peak_mib

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    base = llama(layers=16)
    ids = torch.randint(0, 8000, (2, 128), generator=torch.Generator().manual_seed(rank))
    lm = lora_fx.lorafy(base, lora_fx.Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids,)).train()
    if mode == "DDP":
        model = torch.nn.parallel.DistributedDataParallel(lm)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        model = lora_fx.fully_shard(lm, mesh=init_device_mesh("cpu", (2,)))
    del base
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists before measuring
    gc.collect()
    resident = live_tensor_mib()
    peak = step_peak_mib(step)
    with open(os.path.join(out, f"{mode}_{rank}.json"), "w") as f:
        json.dump({"resident": resident, "step": peak}, f)
    dist.destroy_process_group()


def memory() -> list[dict]:
    import torch.multiprocessing as mp

    out, rows = tempfile.mkdtemp(), []
    for mode in ("DDP", "FSDP2 (lora_fx.fully_shard)"):
        mp.spawn(memory_worker, args=(mode, tempfile.mktemp(), out), nprocs=2, join=True)
        ranks = [json.load(open(os.path.join(out, f"{mode}_{r}.json"))) for r in range(2)]
        worst = max(ranks, key=lambda r: r["resident"] + r["step"])
        rows.append({"variant": mode, "tensors held MiB": worst["resident"], "step peak above MiB": worst["step"],
                     "peak per rank MiB": worst["resident"] + worst["step"]})
    for row in rows:
        row["x DDP"] = row["peak per rank MiB"] / rows[0]["peak per rank MiB"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(2)
    steady_malloc()
    report("trainer", trainer_steps(args.rounds), {"rounds": args.rounds, "batch": "4 x 128",
                                                   "target": "lora_fx Trainer step <= 1.05x PEFT's"})
    report("fsdp_memory", memory(), {"measure": "tensors held + step peak above them, per rank (worst rank)",
                                     "target": "FSDP2 per rank below DDP's"})


if __name__ == "__main__":
    sys.exit(main())
