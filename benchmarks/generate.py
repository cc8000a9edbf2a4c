"""Generation speed: tokens/s and per-token decode latency at batch 1 and 8, 64 new tokens (greedy).

Setting: tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), prompt of 32 tokens, r=16,
alpha=32 on all seven projections, random nonzero adapters identical in PEFT and lora_fx (greedy tokens checked
equal before timing). Variants: PEFT's ``generate`` eager (dynamic cache) and compiled (transformers' static
cache, which compiles the decode step); lora_fx ``lm.generate`` eager and after ``lora_fx.compile(lm)``,
unmerged, merged, and with no adapter active (the base model through the same graphs: the floor). Decode
latency per token = (time for 64 new tokens - time for 1) / 63; interleaved rounds, medians.

    python benchmarks/generate.py [--rounds 12]
"""

from __future__ import annotations

import copy
import time

import torch
from common import PROJECTIONS, interleaved, llama, report, same_adapters, setting
from peft import LoraConfig, get_peft_model

import lora_fx
from lora_fx import Rule

NEW = 64


def lora_fx_models(base, device: str, state: dict | None) -> dict:
    """unmerged / merged / base (no adapter active: the floor), sharing one adapter state."""
    ids = torch.randint(0, 8000, (2, 8), device=device)
    lms = {name: lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids,)).eval()
           for name in ("unmerged", "merged", "base")}
    with torch.no_grad():
        if state is None:
            for _, unit in lms["unmerged"].adapters.iter_units():
                torch.nn.init.normal_(unit.lora_B, std=0.02)
            state = lms["unmerged"].adapters.state_dict()
        for lm in lms.values():
            lm.adapters.load_state_dict(state)
    lms["merged"].merge()
    lms["base"].set_adapter([])
    return lms


def build(base, device: str, compile_: bool) -> dict:
    eager = lora_fx_models(base, device, None)
    peft, peft_static = (get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32,
                                                                        target_modules=PROJECTIONS)).eval()
                         for _ in range(2))
    same_adapters(eager["unmerged"], peft, peft_static)
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default" if device == "cpu" else "reduce-overhead")
    compile_config._compile_all_devices = True  # transformers compiles a static-cache decode step on CUDA only
    peft_static.generation_config.update(cache_implementation="static", compile_config=compile_config)
    variants = {"PEFT eager": ("peft", peft), "lora_fx eager": ("ours", eager["unmerged"]),
                "lora_fx merged eager": ("ours", eager["merged"]), "base eager": ("ours", eager["base"])}
    if compile_:
        compiled = lora_fx_models(base, device, eager["unmerged"].adapters.state_dict())
        variants["PEFT compiled (static cache)"] = ("peft", peft_static)
        for name, key in (("lora_fx compiled", "unmerged"), ("lora_fx merged compiled", "merged"),
                          ("base compiled", "base")):
            variants[name] = ("ours", lora_fx.compile(compiled[key]))
    return variants


def call(kind, model, ids, new):
    with torch.no_grad():
        if kind == "peft":
            return model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0)
        return model.generate(ids, max_new_tokens=new, eos_token_id=[])


def main() -> None:
    args, dtype, size, malloc = setting(12)
    base = llama(dtype=dtype, device=args.device, **size)
    base.config.use_cache = base.generation_config.use_cache = True  # generation keeps a KV cache
    variants = build(base, args.device, not args.no_compile)
    rows, warmup = [], {}
    for batch in (1, 8):
        ids = torch.randint(1, 8000, (batch, 32), generator=torch.Generator().manual_seed(batch)).to(args.device)
        reference = call("peft", variants["PEFT eager"][1], ids, NEW)
        for name, (kind, model) in variants.items():
            t0 = time.perf_counter()
            out = call(kind, model, ids, NEW)
            warmup[(batch, name)] = time.perf_counter() - t0
            if not name.startswith("base"):
                assert torch.equal(out, reference), f"{name}: greedy tokens differ from PEFT's"
        fns = {}
        for name, (kind, model) in variants.items():
            fns[f"{name}|{NEW}"] = lambda k=kind, m=model, x=ids: call(k, m, x, NEW)
            fns[f"{name}|1"] = lambda k=kind, m=model, x=ids: call(k, m, x, 1)
        med = interleaved(fns, args.rounds, args.device, warmup=1)
        for name in variants:
            total, first = med[f"{name}|{NEW}"], med[f"{name}|1"]
            rows.append({"batch": batch, "variant": name, "tokens/s": batch * NEW / total,
                         "decode ms/token": (total - first) / (NEW - 1) * 1e3, "first call s": warmup[(batch, name)]})
        for r in rows:
            if r["batch"] == batch:
                peer = next(x for x in rows if x["batch"] == batch and x["variant"] == "PEFT eager")
                floor = next(x for x in rows if x["batch"] == batch and x["variant"] == (
                    "base compiled" if "compiled" in r["variant"] else "base eager"))
                r["x PEFT eager tokens/s"] = r["tokens/s"] / peer["tokens/s"]
                r["latency x base (same compile)"] = r["decode ms/token"] / floor["decode ms/token"]
    report("generate", rows, {"device": args.device, "dtype": str(dtype), "new_tokens": NEW, "prompt": 32,
                              "rounds": args.rounds, "steady_malloc": malloc,
                              "targets": "eager >= PEFT eager; compiled >= 1.5x PEFT eager; unmerged per-token "
                                         "latency <= 1.10x base under the same compile settings"})


if __name__ == "__main__":
    main()
