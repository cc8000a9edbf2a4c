"""The fused linear cross-entropy (``lorafy(..., fused_loss=True)``): step time and peak memory against PEFT and
the unfused step, at a vocabulary where the logits dominate a step's memory.

Setting (the issue's): tiny Llama hidden 256, 2 layers, vocab 128,256, batch 4 x 512 with labels (the model's own
causal-LM loss), r=16, alpha=32 on all seven projections; AdamW (fused). Checked first: the fused step's loss and
every adapter gradient equal the unfused step's (1e-5 relative). Timed: interleaved rounds, medians. Memory: the
peak of live tensor bytes during one step above what was live before it (torch.profiler records every
allocation and free: exact and deterministic). Targets: peak <= 0.5x PEFT's, time <= 1.0x PEFT's.

    python benchmarks/fused_loss.py [--rounds 6]
"""

from __future__ import annotations

import copy

import torch
from common import PROJECTIONS, interleaved, live_peak_mib, llama, loss_stepper, rel_err, report, setting
from peft import LoraConfig, get_peft_model

import lora_fx
from lora_fx import Rule

VOCAB, BATCH, SEQ = 128256, 4, 512


def main() -> None:
    args, _, _, malloc = setting(6)
    base = llama(hidden=256, intermediate=688, layers=2, heads=4, vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    small = ids[:2, :8]
    rule = Rule(PROJECTIONS, r=16, alpha=32, init=False)
    torch.manual_seed(0)
    plain = lora_fx.lorafy(copy.deepcopy(base), rule, example_inputs=(small,)).train()
    fused = lora_fx.lorafy(copy.deepcopy(base), rule, example_inputs=(small,), fused_loss=True).train()
    fused.adapters.load_state_dict(plain.adapters.state_dict())
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)).train()
    with torch.no_grad():
        for key, unit in plain.adapters.units("default").items():
            layer = peft.base_model.model.get_submodule(key)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)
    checks = {}
    for name, model in (("plain", plain), ("fused", fused), ("peft", peft)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        checks[name] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    loss_err = rel_err(checks["fused"][0], checks["plain"][0])
    grad_err = max(rel_err(a, b) for a, b in zip(checks["fused"][1], checks["plain"][1]))
    peft_err = rel_err(checks["fused"][0], checks["peft"][0])
    assert loss_err < 1e-5 and grad_err < 1e-5 and peft_err < 1e-5, (loss_err, grad_err, peft_err)
    steps = {"PEFT eager": loss_stepper(peft, ids), "lora_fx eager": loss_stepper(plain, ids),
             "lora_fx fused_loss": loss_stepper(fused, ids)}
    for step in steps.values():
        step()  # optimizer state exists before anything is measured
    peaks = {name: live_peak_mib(step) for name, step in steps.items()}
    times = interleaved(steps, args.rounds)
    rows = [{"variant": name, "step ms": times[name] * 1e3, "x PEFT time": times[name] / times["PEFT eager"],
             "step peak MiB": peaks[name], "x PEFT memory": peaks[name] / peaks["PEFT eager"]} for name in steps]
    report("fused_loss", rows, {"rounds": args.rounds, "steady_malloc": malloc,
                                "setting": "hidden 256, 2 layers, vocab 128256, batch 4 x 512, r=16 on every "
                                           "projection",
                                "checked": {"loss rel err vs unfused": loss_err,
                                            "max grad rel err vs unfused": grad_err, "loss rel err vs PEFT": peft_err},
                                "targets": "peak <= 0.5x PEFT; time <= 1.0x PEFT"})
    print(f"fused vs unfused: loss {loss_err:.2e}, gradients {grad_err:.2e} (relative); vs PEFT loss {peft_err:.2e}")


if __name__ == "__main__":
    main()
