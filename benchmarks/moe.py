"""LoRA on mixture-of-experts weights: training step and eval forward against the frozen base and PEFT's
``target_parameters``, over the number of experts.

Setting (the issue's): tiny Qwen3-MoE, hidden 256, experts of width 256, top-2 routing, 4 layers, vocab 4096,
batch 4 x 128, transformers' default experts implementation (``grouped_mm``); r=16, alpha=32 on q/k/v/o and on both
expert stacks; random nonzero adapters, the same in PEFT and lora_fx (outputs checked to 1e-5 relative first). A
step = forward + the model's loss + backward + fused AdamW on the adapters; the floor is the frozen base's forward
+ backward to its inputs. Memory: the peak of live tensor bytes during one step above what was live before it
(torch.profiler, exact). Timed: interleaved rounds, medians, and the spread over rounds.

    python benchmarks/moe.py [--rounds 12] [--experts 8 32 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
from common import interleaved_times, live_peak_mib, loss_stepper, report, steady_malloc
from peft import LoraConfig, get_peft_model

import lora_fx

BATCH, SEQ = 4, 128
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def qwen3_moe(experts: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_experts=experts,
                         num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=64, vocab_size=4096, use_cache=False)
    return Qwen3MoeForCausalLM(cfg).eval()


def forward(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids)
    return run


def one_size(experts: int, rounds: int) -> list[dict]:
    base = qwen3_moe(experts)
    ids = torch.randint(0, 4096, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION, target_parameters=EXPERTS,
                        init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(base), config)
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        lm = lora_fx.from_peft(copy.deepcopy(base), d, example_inputs=(ids[:2, :8],))
    peft.eval()
    with torch.no_grad():
        err = ((lm(ids).logits - peft(ids).logits).norm() / peft(ids).logits.norm()).item()
    assert err < 1e-5, err
    peft.train()
    lm.train()
    steps = {"base (frozen, floor)": loss_stepper(floor, ids, []), "PEFT eager": loss_stepper(peft, ids),
             "lora_fx eager": loss_stepper(lm, ids)}
    for step in steps.values():
        step()  # optimizer state exists before anything is measured
    peaks = {name: live_peak_mib(step) for name, step in steps.items()}
    peft.eval()
    lm.eval()
    fwd = {"base forward": forward(base, ids), "PEFT forward": forward(peft, ids),
           "lora_fx forward": forward(lm, ids)}
    peft.train()
    lm.train()
    times = interleaved_times({**steps, **fwd}, rounds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        is_step = name in steps
        ref = med["base (frozen, floor)" if is_step else "base forward"]
        rows.append({"E": experts, "variant": name, "ms": med[name] * 1e3,
                     "x floor": med[name] / ref, "range x floor": f"{min(ts) / ref:.2f}-{max(ts) / ref:.2f}",
                     "peak MiB": peaks.get(name, float("nan")),
                     "x floor memory": peaks[name] / peaks["base (frozen, floor)"] if is_step else float("nan"),
                     "rel err vs PEFT": err})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    args = p.parse_args()
    malloc = steady_malloc()
    torch.set_num_threads(2)
    rows = [row for e in args.experts for row in one_size(e, args.rounds)]
    report("moe", rows, {"rounds": args.rounds, "steady_malloc": malloc, "batch": BATCH, "seq": SEQ,
                         "setting": "Qwen3-MoE hidden 256, experts width 256, top-2, 4 layers, vocab 4096; r=16 on "
                                    "q/k/v/o and both expert stacks; grouped_mm experts",
                         "targets": "step <= 1.15x floor time and <= 1.10x floor peak memory; eval forward <= "
                                    "1.15x base; flat over E while PEFT's grow"})


if __name__ == "__main__":
    main()
