"""PEFT's forward variants: lora_fx's training step against PEFT's same variant, same adapters.

Setting: the issue's tiny Llama (hidden 512, 4 layers, vocab 8000), batch 4 x 128; r=16, alpha=32 on all seven
projections; each variant's PEFT config with ``init_lora_weights=False`` (nonzero B; QA-LoRA through PEFT's
``GPTQLoraLinear`` over the full-precision layers, as gptqmodel does not install here), saved by PEFT and loaded by
``lora_fx.from_peft``, so both hold the same adapters (losses checked to 1e-5 relative first). A step = forward +
the model's loss (+ the variant's regularizer where it has one) + backward + fused AdamW on the adapters; eager,
training mode.
Interleaved rounds, medians, and the range over rounds.

    python benchmarks/variants.py [--rounds 12] [--variants bdlora kasa]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
from common import PROJECTIONS, interleaved_times, llama, report, steady_malloc
from peft import LoraConfig, get_peft_model

import lora_fx

BATCH, SEQ = 4, 128
INVOCATION = [7, 11]  # every row invokes aLoRA at position 64


def configs() -> dict[str, dict]:
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

    return {
        "plain LoRA": {},
        "BD-LoRA (2 blocks)": {"use_bdlora": BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"],
                                                           target_modules_bd_b=["q_proj", "k_proj", "v_proj",
                                                                                "gate_proj", "up_proj"], nblocks=2)},
        "KaSA": {"kasa_config": KasaConfig()},
        "VeLoRA (64 groups)": {"velora_config": VeloraConfig()},
        "MonteCLoRA (8 samples)": {"monteclora_config": MontecloraConfig()},
        "aLoRA (invoked mid-sequence)": {"alora_invocation_tokens": INVOCATION, "task_type": "CAUSAL_LM"},
        "QA-LoRA (group 32)": {"use_qalora": True, "qalora_group_size": 32},
    }


def stepper(model, ids, regularizer):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step():
        loss = model(input_ids=ids, labels=ids).loss + regularizer()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def one_variant(name: str, extra: dict, rounds: int) -> dict:
    base = llama()
    ids = torch.randint(0, 8000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    ids[:, 64:66] = torch.tensor(INVOCATION)
    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, init_lora_weights=False, **extra)
    if extra.get("use_qalora"):  # PEFT's QA-LoRA layer (for GPTQ bases) over these full-precision ones
        from peft.tuners.lora.gptq import GPTQLoraLinear
        config._register_custom_module({torch.nn.Linear: GPTQLoraLinear})
    peft = get_peft_model(copy.deepcopy(base), config)
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        lm = lora_fx.from_peft(copy.deepcopy(base), d, example_inputs=(ids[:2, :8],))
    peft_reg = peft.base_model._get_kasa_loss if "kasa_config" in extra else \
        peft.base_model._get_monteclora_loss if "monteclora_config" in extra else (lambda: 0.0)
    peft.eval(), lm.eval()  # sampling variants compare their deterministic (eval) forward
    with torch.no_grad():
        want, got = peft(input_ids=ids, labels=ids).loss, lm(input_ids=ids, labels=ids).loss
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()), (name, got.item(), want.item())
    peft.train(), lm.train()  # training mode: VeLoRA's compressed backward runs only there
    times = interleaved_times({"PEFT": stepper(peft, ids, peft_reg), "lora_fx": stepper(lm, ids, lm.variant_loss)},
                              rounds)
    ratios = sorted(a / b for a, b in zip(times["lora_fx"], times["PEFT"]))
    return {"variant": name, "PEFT ms": 1e3 * statistics.median(times["PEFT"]),
            "lora_fx ms": 1e3 * statistics.median(times["lora_fx"]),
            "x PEFT": statistics.median(ratios), "x PEFT range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=None, help="names as in the table (default: all)")
    args = p.parse_args()
    torch.set_num_threads(2)
    malloc = steady_malloc()
    chosen = {k: v for k, v in configs().items() if args.variants is None or k in args.variants}
    rows = [one_variant(name, extra, args.rounds) for name, extra in chosen.items()]
    report("variants", rows, {"what": "train step (eager, fused AdamW), tiny Llama hidden 512 x 4 layers, batch "
                                      "4 x 128, r=16 on all projections, same adapters in both",
                              "rounds": args.rounds, "steady_malloc": malloc,
                              "target": "each forward variant's step <= 1.0x PEFT's same variant"})


if __name__ == "__main__":
    main()
