"""Shared benchmark plumbing: the tiny-Llama setting, interleaved timing rounds, tables and JSON.

Method (see BENCHMARKING.md of the project): build every variant first, warm each up (compile included),
then repeat rounds of A, B, C, ... in one process and take each variant's median over all rounds. Report
ratios, not times. Every variant's output is checked against a reference before it is timed.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate

HERE = Path(__file__).resolve().parent


def steady_malloc() -> bool:
    """Keep glibc from returning large freed blocks to the OS (mmap / trim), so big activations are not
    page-faulted in again on every step. Applies to every variant alike; it removes ±15% noise that depends on
    heap history, not on the code measured. Returns False where glibc is not available."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False


def setting(default_rounds: int):
    """Parse the common flags and apply the machine settings. Returns (args, dtype, model size kwargs, malloc).
    CPU: float32, the issue's tiny Llama, 2 threads; CUDA: bf16 at hidden 2048, 16 layers."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=default_rounds)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-steady-malloc", action="store_true", help="leave glibc's mmap/trim thresholds alone")
    args = p.parse_args()
    malloc = not args.no_steady_malloc and steady_malloc()
    if args.device == "cpu":
        torch.set_num_threads(2)
        return args, torch.float32, {}, malloc
    return args, torch.bfloat16, dict(hidden=2048, intermediate=5504, layers=16, heads=16, vocab=32000), malloc


def llama(hidden: int = 512, intermediate: int = 1376, layers: int = 4, heads: int = 8, vocab: int = 8000,
          dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """The issue's tiny Llama, random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=2048, use_cache=False)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, device: str = "cpu",
                warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each variant over ``rounds`` interleaved rounds (after ``warmup`` calls)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(variants: dict[str, Callable[[], object]], rounds: int,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of every call of each variant over ``rounds`` interleaved rounds (after ``warmup`` calls): for
    medians and the range over rounds."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def machine() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def report(name: str, rows: list[dict], meta: dict) -> None:
    """Print a table and write ``benchmarks/<name>.json``."""
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), floatfmt=".3f"))
    out = HERE / f"{name}.json"
    out.write_text(json.dumps({"benchmark": name, "machine": machine(), **meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


def step_peak_mib(step: Callable[[], object], steps: int = 3) -> float:
    """Peak resident set above the one before the first step, in MiB, sampled every millisecond over ``steps``
    calls of ``step`` (freed memory is released to the OS first). Run it in a fresh process per variant."""
    import ctypes
    import ctypes.util
    import gc
    import threading

    import psutil

    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    proc = psutil.Process()
    rss0, peak, done = proc.memory_info().rss, [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    for _ in range(steps):
        step()
    done[0] = True
    t.join()
    return (peak[0] - rss0) / 2**20


@torch.no_grad()
def same_adapters(lm, *peft_models, randomize_b: bool = False) -> None:
    """Copy ``lm``'s default adapter into each PEFT model (``randomize_b``: draw B ~ N(0, 0.02) first, so the
    adapters change the outputs and the variants can be checked against each other)."""
    for key, unit in lm.adapters.units("default").items():
        if randomize_b:
            torch.nn.init.normal_(unit.lora_B, std=0.02)
        for pm in peft_models:
            layer = pm.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def live_peak_mib(step: Callable[[], object]) -> float:
    """Peak of live tensor memory during one call of ``step``, above what was live before it: every allocation
    and free recorded by torch.profiler (exact, unlike sampling the resident set)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def loss_stepper(model, ids: torch.Tensor, params: list | None = None) -> Callable[[], torch.Tensor]:
    """One training step on the model's own causal-LM loss (``labels=ids``): backward, then fused AdamW on
    ``params`` (default: the parameters that require grad; ``[]``: no optimizer, the frozen floor)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    return step
