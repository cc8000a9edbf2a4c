"""Forward latency, no grad: base model, PEFT, lora_fx unmerged and merged; eager and compiled.

Setting: tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), r=16, alpha=32 on all
seven projections, random nonzero adapters; batch 4 x 128 and 1 x 1 token (decode size).
Targets: unmerged compiled <= 1.08x base compiled (4x128) and <= 1.05x (1x1); unmerged eager <= 1.00x PEFT
eager at both sizes; merged compiled <= 1.02x base compiled.

    python benchmarks/forward.py [--rounds 30] [--no-compile] [--device cuda]
"""

from __future__ import annotations

import copy

import torch
from common import PROJECTIONS, interleaved, llama, rel_err, report, same_adapters, setting
from peft import LoraConfig, get_peft_model

import lora_fx
from lora_fx import Rule


def build(base, ids0, compile_: bool) -> dict:
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)).eval()
    unmerged = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids0,)).eval()
    same_adapters(unmerged, peft, randomize_b=True)
    merged = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids0,))
    merged.adapters.load_state_dict(unmerged.adapters.state_dict())
    merged_gm = merged.merge_and_unload()
    models = {"base eager": base, "PEFT eager": peft, "lora_fx unmerged eager": unmerged,
              "lora_fx merged eager": merged_gm}
    if compile_:
        models.update({"base compiled": lora_fx.compile(base), "PEFT compiled": torch.compile(peft),
                       "lora_fx unmerged compiled": lora_fx.compile(unmerged),
                       "lora_fx merged compiled": lora_fx.compile(merged_gm)})
    return models


def main() -> None:
    args, dtype, size, malloc = setting(30)
    base = llama(dtype=dtype, device=args.device, **size)
    ids0 = torch.randint(0, base.config.vocab_size, (4, 128), device=args.device)
    models = build(base, ids0, not args.no_compile)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    rows = []
    with torch.no_grad():
        for b, t in [(4, 128), (1, 1)]:
            ids = torch.randint(0, base.config.vocab_size, (b, t), device=args.device)
            ref = models["PEFT eager"](ids).logits
            for name, m in models.items():  # correct first
                if not name.startswith("base"):
                    assert rel_err(m(ids).logits, ref) < tol, name
            med = interleaved({n: (lambda m=m, ids=ids: m(ids)) for n, m in models.items()}, args.rounds, args.device)
            for name, s in med.items():
                mode = "compiled" if "compiled" in name else "eager"
                rows.append({"batch x tokens": f"{b}x{t}", "variant": name, "ms": s * 1e3,
                             "x base": s / med[f"base {mode}"], "x PEFT": s / med[f"PEFT {mode}"]})
    report("forward", rows, {"device": args.device, "dtype": str(dtype), "rounds": args.rounds,
                             "setting": malloc})


if __name__ == "__main__":
    main()
