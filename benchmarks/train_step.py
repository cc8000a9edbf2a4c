"""Training-step time: base model (frozen: the floor), PEFT eager/compiled, lora_fx eager/compiled.

Setting: tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), batch 4 x 128,
r=16, alpha=32 on all seven projections, AdamW on the adapters (``fused=True``: Hugging Face Trainer's default
optimizer, ``adamw_torch_fused``, for every variant). A step = forward + cross-entropy + backward + optimizer
step. The floor is the frozen base model's forward + backward to its inputs.

    python benchmarks/train_step.py [--rounds 15] [--no-compile] [--device cuda]
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from common import PROJECTIONS, interleaved, llama, rel_err, report, same_adapters, setting
from peft import LoraConfig, get_peft_model

import lora_fx
from lora_fx import Rule


def step_fn(model, ids, params):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

    def step():
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    step.model, step.ids, step.params = model, ids, params
    return step


def build(device: str, dtype: torch.dtype, size: dict, batch: int, seq: int, compile_: bool):
    base = llama(dtype=dtype, device=device, **size)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    floor.enable_input_require_grads()  # backward reaches the inputs, as a LoRA step must
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    lm = lora_fx.lorafy(copy.deepcopy(base), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids,))
    same_adapters(lm, peft, randomize_b=True)  # same nonzero adapters in both, so the outputs can be checked
    with torch.no_grad():
        assert rel_err(lm(ids).logits, peft(ids).logits) < (1e-5 if dtype == torch.float32 else 2e-2)
    peft_params = [p for p in peft.parameters() if p.requires_grad]
    variants = {
        "base (frozen, floor)": step_fn(floor, ids, []),
        "PEFT eager": step_fn(peft, ids, peft_params),
        "lora_fx eager": step_fn(lm, ids, lm.trainable_parameters()),
    }
    compile_s = {}
    if compile_:
        lm_c = copy.deepcopy(lm)  # lora_fx.compile compiles a LoraModel's blocks in place: the eager one stays eager
        for name, model, params in [("base compiled (floor)", floor, []), ("PEFT compiled", peft, peft_params),
                                    ("lora_fx compiled", lm_c, lm_c.trainable_parameters())]:
            fn = step_fn(lora_fx.compile(model), ids, params)
            t0 = time.perf_counter()
            fn(), fn()
            compile_s[name] = time.perf_counter() - t0
            variants[name] = fn
    return variants, compile_s


def main() -> None:
    args, dtype, size, malloc = setting(15)
    batch, seq = (4, 128)
    variants, compile_s = build(args.device, dtype, size, batch, seq, not args.no_compile)
    med = interleaved(variants, args.rounds, args.device)
    rows = []
    for name, s in med.items():
        compiled = "compiled" in name
        peer = med["PEFT compiled" if compiled else "PEFT eager"]
        floor = med["base compiled (floor)" if compiled else "base (frozen, floor)"]
        rows.append({"variant": name, "ms": s * 1e3, "x PEFT": s / peer, "x floor": s / floor,
                     "warm-up s": compile_s.get(name, float("nan"))})
    report("train_step", rows, {"device": args.device, "dtype": str(dtype), "batch": batch, "seq": seq,
                                "rounds": args.rounds, "steady_malloc": malloc,
                                "targets": "lora_fx <= 1.08x floor eager and compiled (<= 0.96x PEFT)"})


if __name__ == "__main__":
    main()
