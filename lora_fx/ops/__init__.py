"""The functions LoRA graph nodes call: the fused sibling ops (``group``, ``linear_group``), PEFT's DoRA forwards
(``dora``) and bitsandbytes' quantized linears as custom ops (``quantized``). The adapter bank's routed ops live
with the bank (``bank.routing``)."""

from .group import lora_linear_group
from .linear_group import linear_lora_group

__all__ = ["lora_linear_group", "linear_lora_group"]
