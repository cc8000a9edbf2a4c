"""The GPU table: train step (PEFT and lora_fx, eager and compiled, with and without the fused loss), its peak
memory, decode latency and routed adapters, on CUDA in bf16; written to benchmarks/gpu.json and, with
``--write-results``, to the GPU section of RESULTS.md.

Setting: Llama hidden 2048, intermediate 5504, 16 layers, 16 heads, vocab 32000, bf16; batch 4 x 1024 with
labels (the model's own loss), r=16, alpha=32 on all seven projections, fused AdamW. Every variant's loss is
checked against PEFT eager (2e-2 relative in bf16) before it is timed. Timing: CUDA events, interleaved rounds,
medians. Memory: ``torch.cuda.max_memory_allocated`` over one step after ``reset_peak_memory_stats``.
Targets (issue #29): train step <= 0.8x PEFT eager and <= 0.95x PEFT compiled; peak memory <= PEFT's, and
<= 0.6x with the fused loss.

    python benchmarks/gpu.py [--rounds 10] [--write-results]        # on a CUDA machine (benchmarks/gpu.sh)
    python benchmarks/gpu.py --tiny --device cpu                    # the same code on a tiny model, for CI-less checks
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time

import torch
from common import HERE, PROJECTIONS, llama, loss_stepper, rel_err, report, same_adapters
from peft import LoraConfig, get_peft_model

import lora_fx
from lora_fx import Rule


def timer(device: str):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run(fn):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run_cpu


def peak_mib(fn, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def train_table(base, ids, rounds: int, device: str) -> list[dict]:
    small = ids[:2, :8]
    rule = Rule(PROJECTIONS, r=16, alpha=32, init=False)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    models = {"lora_fx": lora_fx.lorafy(copy.deepcopy(base), rule, example_inputs=(small,)),
              "lora_fx fused loss": lora_fx.lorafy(copy.deepcopy(base), rule, example_inputs=(small,),
                                                   fused_loss=True)}
    same_adapters(models["lora_fx"], peft, randomize_b=True)
    models["lora_fx fused loss"].adapters.load_state_dict(models["lora_fx"].adapters.state_dict())
    peft_params = [p for p in peft.parameters() if p.requires_grad]
    variants = {"PEFT eager": loss_stepper(peft.train(), ids, peft_params)}
    for name, lm in models.items():
        variants[f"{name} eager"] = loss_stepper(lm.train(), ids, lm.trainable_parameters())
    ref = variants["PEFT eager"]().detach()
    tol = 2e-2 if ids.is_cuda else 1e-4
    for name, step in list(variants.items()):
        assert rel_err(step().detach(), ref) < tol, name
    variants["PEFT compiled"] = loss_stepper(torch.compile(peft), ids, peft_params)
    for name, lm in models.items():
        twin = copy.deepcopy(lm)
        variants[f"{name} compiled"] = loss_stepper(lora_fx.compile(twin), ids, twin.trainable_parameters())
    compile_s = {}
    for name in [n for n in variants if "compiled" in n]:
        t0 = time.perf_counter()
        assert rel_err(variants[name]().detach(), ref) < 5 * tol, name
        variants[name]()
        compile_s[name] = time.perf_counter() - t0
    peaks = {name: peak_mib(step, device) for name, step in variants.items()}
    run, times = timer(device), {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            times[name].append(run(step))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name in variants:
        peer = "PEFT compiled" if "compiled" in name else "PEFT eager"
        rows.append({"train step": name, "ms": med[name] * 1e3, "x PEFT (same compile)": med[name] / med[peer],
                     "peak MiB": peaks[name], "x PEFT memory": peaks[name] / peaks[peer] if peaks[peer] else
                     float("nan"), "compile s": compile_s.get(name, float("nan"))})
    return rows


def decode_table(base, device: str, new: int) -> list[dict]:
    ids = torch.randint(0, base.config.vocab_size, (1, 32), device=device)
    rule = Rule(PROJECTIONS, r=16, alpha=32, init=False)
    rows, out = [], {}
    for name in ("base compiled", "lora_fx compiled", "lora_fx merged compiled"):
        lm = lora_fx.lorafy(copy.deepcopy(base), rule, example_inputs=(ids,)).eval()
        if name == "base compiled":
            lm.set_adapter([])
        elif "merged" in name:
            lm.merge()
        lora_fx.compile(lm)
        lm.generate(ids, max_new_tokens=4, eos_token_id=[])
        run = timer(device)
        full = statistics.median(run(lambda lm=lm: lm.generate(ids, max_new_tokens=new, eos_token_id=[]))
                                 for _ in range(3))
        one = statistics.median(run(lambda lm=lm: lm.generate(ids, max_new_tokens=1, eos_token_id=[]))
                                for _ in range(3))
        out[name] = (full - one) / (new - 1)
    for name, s in out.items():
        rows.append({"decode (batch 1)": name, "ms/token": s * 1e3, "x base compiled": s / out["base compiled"]})
    return rows


def routed_table(base, device: str, rounds: int) -> list[dict]:
    ids = torch.randint(0, base.config.vocab_size, (8, 128), device=device)
    names = [f"a{i}" for i in range(4)]
    lm = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids[:2, :8],),
                        adapter_name="a0").eval()
    for name in names[1:]:
        lm.add_adapter(name, Rule(PROJECTIONS, r=16, alpha=32))
    lm.build_adapter_bank()
    route = [names[i % 4] for i in range(8)]
    run = timer(device)
    variants = {"one adapter": lambda: lm(ids), "routed, 4 adapters": lambda: lm(ids, adapter_names=route)}
    with torch.no_grad():
        for fn in variants.values():
            fn()
        times = {k: statistics.median(run(fn) for _ in range(rounds)) for k, fn in variants.items()}
    return [{"forward 8 x 128": k, "ms": t * 1e3, "x one adapter": t / times["one adapter"]} for k, t in times.items()]


def write_results(tables: list[list[dict]], meta: str) -> None:
    def md(rows):
        head = list(rows[0])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
                  for r in rows]
        return "\n".join(lines)
    section = ("## GPU (benchmarks/gpu.py)\n\n" + meta + "\n\n" + "\n\n".join(md(t) for t in tables) + "\n")
    path = HERE / "RESULTS.md"
    text = path.read_text()
    pattern = re.compile(r"## GPU \(benchmarks/gpu\.py\)\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(section.rstrip("\n"), text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks the script, times nothing useful")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    device = args.device
    if args.tiny:
        size, batch, seq, dtype, new = dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=512), 2, 32, \
            torch.float32, 8
    else:
        size, batch, seq, dtype, new = dict(hidden=2048, intermediate=5504, layers=16, heads=16, vocab=32000), 4, \
            1024, torch.bfloat16, 64
    torch.manual_seed(0)
    base = llama(dtype=dtype, device=device, **size)
    ids = torch.randint(0, size["vocab"], (batch, seq), device=device)
    tables = [train_table(base, ids, args.rounds, device), decode_table(base, device, new),
              routed_table(base, device, args.rounds)]
    for name, rows in zip(("gpu_train", "gpu_decode", "gpu_routed"), tables):
        report(name, rows, {"device": device, "dtype": str(dtype), "size": size, "batch": batch, "seq": seq})
    if args.write_results:
        name = torch.cuda.get_device_name() if device == "cuda" else device
        meta = (f"{name}, torch {torch.__version__}, {dtype}, hidden {size['hidden']}, {size['layers']} layers, "
                f"batch {batch} x {seq}, r=16 on all seven projections, {time.strftime('%Y-%m-%d')}.")
        write_results(tables, meta)


if __name__ == "__main__":
    main()
