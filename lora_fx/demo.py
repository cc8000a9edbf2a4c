"""The built-in demo: LoRA-tune a tiny Llama (random weights, built from a config) on a toy task.

Task: continue a counting sequence ``s, s+1, s+2, ... (mod vocab)``. The base model knows nothing; a
rank-8 adapter on every attention and MLP projection and on the output head learns it in a few dozen steps
(the head too, because a random frozen head caps how confident any prediction can be). The demo generates
from one prompt before and after training.

Example::

    lora-fx demo --steps 60 --out demo_adapter
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .api import lorafy
from .rules import Rule

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [*PROJECTIONS, "lm_head"]


@dataclass
class DemoConfig:
    steps: int = 120
    batch: int = 16
    seq_len: int = 24
    vocab: int = 32
    hidden: int = 64
    layers: int = 2
    r: int = 8
    alpha: float = 16
    lr: float = 1e-2
    seed: int = 0
    prompt_start: int = 5
    out: str = "lora_fx_demo_adapter"


def counting_batch(cfg: DemoConfig, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq_len] token ids: each row counts up from a random start, modulo the vocabulary."""
    start = torch.randint(0, cfg.vocab, (cfg.batch, 1), generator=generator)
    return (start + torch.arange(cfg.seq_len)) % cfg.vocab


def run_demo(cfg: DemoConfig | None = None, progress: bool = True) -> dict:
    """Build, lorafy, train and save; returns the losses and paths. Prints the report as it goes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = cfg or DemoConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ))
    ids = counting_batch(cfg, gen)
    lm = lorafy(model.eval(), Rule(TARGETS, r=cfg.r, alpha=cfg.alpha), example_inputs=(ids,))
    print(lm.report())
    lm.print_trainable_parameters()
    prompt = torch.arange(cfg.prompt_start, cfg.prompt_start + 4)[None] % cfg.vocab
    before = lm.generate(prompt, max_new_tokens=8, eos_token_id=[])  # the adapter starts as the identity

    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=cfg.lr)
    lm.train()
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training", disable=not progress, ncols=80)
    for _ in bar:
        ids = counting_batch(cfg, gen)
        logits = lm(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    lm.eval()
    elapsed = time.perf_counter() - t0
    out = Path(cfg.out)
    lm.save_pretrained(out)
    first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
    print(f"loss: {first:.3f} (first 5 steps) -> {last:.3f} (last 5 steps) in {elapsed:.1f}s")
    after = lm.generate(prompt, max_new_tokens=8, eos_token_id=[])
    shown = " ".join(map(str, prompt[0].tolist()))
    print(f"generate from [{shown}]:  before training -> {' '.join(map(str, before[0, 4:].tolist()))}")
    print(f"{'':>{len(shown) + 17}}after training  -> {' '.join(map(str, after[0, 4:].tolist()))}")
    print(f"adapter saved to {out}/ (adapter_config.json, adapter_model.safetensors)")
    return {"losses": losses, "out": str(out), "seconds": elapsed, "before": before, "after": after}
