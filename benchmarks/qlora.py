"""QLoRA training step on a 4-bit (nf4, double quantization) base: lora_fx vs PEFT, time and peak memory.

The model is the tiny Llama of the other benchmarks at hidden 256 (bitsandbytes' CPU 4-bit kernels want feature
sizes that are multiples of 32), loaded 4-bit from a temporary directory; r=16 on all seven projections, AdamW,
batch 4 x 128, float32 compute, training mode (bitsandbytes' own training path: dequantize, then matmul).

- step time: both variants in one process, median over interleaved rounds (``--rounds``, >= 12);
- peak memory: each variant in a fresh process, resident set sampled every millisecond over 3 steps, minus the
  resident set before the first step (as ``memory.py``).

    python benchmarks/qlora.py [--rounds 12]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import torch
from common import (
    PROJECTIONS,
    interleaved,
    llama,
    rel_err,
    report,
    same_adapters,
    setting,
    steady_malloc,
    step_peak_mib,
)
from train_step import step_fn

SIZE = dict(hidden=256, intermediate=768, layers=4, heads=8, vocab=8000)
VARIANTS = ["PEFT eager", "lora_fx eager"]


def build(names=VARIANTS):
    import bitsandbytes  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import lora_fx
    from lora_fx import Rule

    directory = tempfile.mkdtemp()
    llama(**SIZE).save_pretrained(directory)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

    def load():
        return LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu").train()

    ids = torch.randint(0, SIZE["vocab"], (4, 128), generator=torch.Generator().manual_seed(0))
    out = {}
    if "PEFT eager" in names:
        peft = get_peft_model(load(), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)).train()
        out["PEFT eager"] = step_fn(peft, ids, [p for p in peft.parameters() if p.requires_grad])
    if "lora_fx eager" in names:
        lm = lora_fx.lorafy(load(), Rule(PROJECTIONS, r=16, alpha=32), example_inputs=(ids,)).train()
        out["lora_fx eager"] = step_fn(lm, ids, lm.trainable_parameters())
    if len(out) == 2:  # the same adapter weights give the same loss
        same_adapters(lm, peft, randomize_b=True)
        with torch.no_grad():
            assert rel_err(lm(ids).logits, peft(ids).logits) < 1e-4
    return out


def child(name: str) -> None:
    torch.set_num_threads(2)
    steady_malloc()
    step = build([name])[name]
    print(json.dumps({"variant": name, "step_peak_mib": step_peak_mib(step)}))


def main() -> None:
    args, _, _, malloc = setting(12)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("qlora.py: skipped, bitsandbytes is not installed (pip install -e '.[qlora]')")
        return
    variants = build()
    runs = [interleaved(variants, args.rounds) for _ in range(3)]  # three repeats: a range, not one number
    peaks = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                             check=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["step_peak_mib"]
    rows = []
    for name in VARIANTS:
        ratios = [r[name] / r["PEFT eager"] for r in runs]
        rows.append({"variant": name, "step ms": 1000 * sorted(r[name] for r in runs)[1],
                     "x PEFT (min-max)": f"{min(ratios):.3f}-{max(ratios):.3f}",
                     "step peak MiB": peaks[name], "peak x PEFT": peaks[name] / peaks["PEFT eager"]})
    report("qlora", rows, {"rounds": args.rounds, "repeats": 3, "steady_malloc": malloc, "size": SIZE,
                           "targets": "step <= 1.05x PEFT, peak memory <= PEFT's"})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
