"""Fine-tune a tiny Llama with lora_fx, save in PEFT's format, and load the adapter back in PEFT.

    python examples/finetune_peft_roundtrip.py
"""

import tempfile

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx import Rule

# settings
VOCAB, HIDDEN, STEPS, LR = 64, 64, 30, 1e-2

config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, VOCAB, (8, 32))  # [batch, seq]

lm = lora_fx.lorafy(model, Rule(["q_proj", "v_proj", "up_proj", "down_proj"], r=8, alpha=16),
                    example_inputs=(ids,))
print(lm.report())
opt = torch.optim.AdamW(lm.trainable_parameters(), lr=LR)
for step in range(STEPS):
    logits = lm(ids).logits  # [batch, seq, vocab]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}")

with tempfile.TemporaryDirectory() as out, torch.no_grad():
    lm.save_pretrained(out)
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), out)
    diff = (peft_model(ids).logits - lm(ids).logits).abs().max().item()
    print(f"PEFT reads the adapter: max |logits difference| = {diff:.2e}")
