"""Fine-tune a tiny Llama with Hugging Face's Trainer (default settings), generate what it learnt, and load the
checkpoint in PEFT.

Task: continue a counting sequence ``s, s+1, s+2, ... (mod vocab)`` from a random start.

    python examples/finetune_trainer.py
"""

import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lora_fx
from lora_fx import Rule

# settings
VOCAB, HIDDEN, SEQ, ROWS, EPOCHS = 32, 64, 16, 256, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]

config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
starts = torch.randint(0, VOCAB, (ROWS, 1))
rows = ((starts + torch.arange(SEQ)) % VOCAB).tolist()  # [rows, seq]
dataset = Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])

lm = lora_fx.lorafy(model, Rule(TARGETS, r=8, alpha=16), example_inputs=(torch.tensor(rows[:2]),))
prompt = torch.tensor([[5, 6, 7, 8]])
before = lm.generate(prompt, max_new_tokens=8, eos_token_id=[])

out = tempfile.mkdtemp()
args = TrainingArguments(output_dir=out, num_train_epochs=EPOCHS, learning_rate=1e-2, report_to=[], use_cpu=True,
                         logging_steps=20)
trainer = Trainer(model=lm, args=args, train_dataset=dataset)  # lm is called with input_ids and labels
trainer.train()
trainer.save_model(f"{out}/final")  # a PEFT adapter directory

after = lm.generate(prompt, max_new_tokens=8, eos_token_id=[])
print("prompt 5 6 7 8 -> before:", before[0, 4:].tolist())
print("                   after: ", after[0, 4:].tolist())

torch.manual_seed(0)  # the same base weights (the base stayed frozen)
peft_model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), f"{out}/final")
with torch.no_grad():
    diff = (peft_model(prompt).logits - lm(prompt).logits).abs().max().item()
print(f"PEFT loads the Trainer's checkpoint: max |logits difference| = {diff:.2e}")
