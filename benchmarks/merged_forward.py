"""Merged + compiled forward latency vs the base model compiled, and vs unmerged (LoRA branches) compiled.

Setting: tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), r=16, alpha=32 on all
seven projections, random nonzero adapters; batch 4 x 128 and 1 x 1 token; no grad.
Target: merged+compiled <= 1.02x base compiled.

    python benchmarks/merged_forward.py [--rounds 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import PROJECTIONS, interleaved, llama, rel_err, report

import lora_fx
from lora_fx import Rule


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(2) if args.device == "cpu" else None
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    size = {} if args.device == "cpu" else dict(hidden=2048, intermediate=5504, layers=16, heads=16, vocab=32000)
    base = llama(dtype=dtype, device=args.device, **size)
    shapes = [(4, 128), (1, 1)]
    ids0 = torch.randint(0, base.config.vocab_size, shapes[0], device=args.device)

    def lorafied():
        lm = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids0,))
        for _, unit in lm.adapters.iter_units():
            torch.nn.init.normal_(unit.lora_B, std=0.02)
        return lm

    unmerged = lorafied()
    merged = lorafied()
    merged.adapters.load_state_dict(unmerged.adapters.state_dict())
    merged_gm = merged.merge_and_unload()
    models = {
        "base (compiled)": lora_fx.compile(base),
        "lora_fx merged (compiled)": lora_fx.compile(merged_gm),
        "lora_fx unmerged (compiled)": lora_fx.compile(unmerged),
    }
    rows = []
    with torch.no_grad():
        for b, t in shapes:
            ids = torch.randint(0, base.config.vocab_size, (b, t), device=args.device)
            ref = unmerged(ids).logits
            assert rel_err(models["lora_fx merged (compiled)"](ids).logits, ref) < (1e-5 if dtype == torch.float32
                                                                                   else 2e-2)
            calls = {name: (lambda m=m, ids=ids: m(ids)) for name, m in models.items()}
            med = interleaved(calls, args.rounds, args.device)
            floor = med["base (compiled)"]
            for name, s in med.items():
                rows.append({"batch x tokens": f"{b}x{t}", "variant": name, "ms": s * 1e3, "x base": s / floor})
    report("merged_forward", rows, {"device": args.device, "dtype": str(dtype), "rounds": args.rounds,
                                    "target": "merged <= 1.02x base (compiled)"})


if __name__ == "__main__":
    main()
