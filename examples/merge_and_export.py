"""Merge an adapter into the weights, compile the plain graph, and export it as a .pt2 program.

    python examples/merge_and_export.py
"""

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx
from lora_fx import Rule

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
ids = torch.randint(0, 64, (2, 16))
lm = lora_fx.lorafy(model, Rule(["q_proj", "v_proj"], init=False), example_inputs=(ids,))
with torch.no_grad():
    before = lm(ids).logits

    gm = lm.merge_and_unload()  # W' = W + s·B·A, no LoRA nodes left
    print("LoRA nodes left:", sum("lora" in n.name for n in gm.graph.nodes))
    fast = lora_fx.compile(gm)
    print("compiled merged vs LoRA graph:", (fast(ids).logits - before).abs().max().item())

    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "model.pt2"
        lora_fx.export(gm, path, example_inputs=(ids,))
        program = torch.export.load(path).module()
        other = torch.randint(0, 64, (3, 9))  # another batch size and length: the program is dynamic
        print("exported program, new shape:", tuple(program(other).logits.shape))
