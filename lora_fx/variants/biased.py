"""LoRA with a bias on B (PEFT's LoRA bias): ``y' = y + s · (B A dropout(x) + b)``; merging adds ``s·b`` to the
base layer's bias (which must exist). Not routable, fusable or combinable.

Example::

    unit.lora_B_bias.shape      # (out,)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RuleError
from .base import Variant


class Biased(Variant):
    name = "biased"
    label = "a LoRA bias"
    routable = fusable = combinable = False

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if not kind.supports_bias:
            raise RuleError(f"{self.field} on {key!r}: PEFT has no LoRA bias for a {kind.name}; drop {self.field} "
                            "here.")
        if getattr(geometry, "left", False):
            raise RuleError(f"{self.field} on {key!r}: its weight is the left operand of a matmul (W @ x), which "
                            "PEFT's LoRA bias does not describe; drop it for this key.")

    def extra_parameters(self, kind, geometry, dtype, device):
        out = kind.shapes(geometry, 1)[1][0]
        return {"lora_B_bias": nn.Parameter(torch.zeros(out, dtype=dtype, device=device))}

    def bias_delta(self, unit, dtype):
        return unit.scaling * unit.lora_B_bias.detach().to(dtype)

    def peft_tensors(self, unit):
        return {**super().peft_tensors(unit), "lora_B.bias": unit.lora_B_bias}

    def eager_b(self, unit, h):
        return torch.nn.functional.linear(h, unit.lora_B, unit.lora_B_bias)

    def b_bias(self, bb):
        return bb.tensor("lora_B_bias")


BIASED = Biased()
