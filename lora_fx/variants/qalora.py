"""QA-LoRA (quantization-aware LoRA, PEFT's ``use_qalora`` with ``qalora_group_size``): the input is averaged over
groups of ``g`` consecutive features before A, so A is ``[r, in/g]``, one column per group, the grouping a
group-wise quantized base (GPTQ) shares::

    p(x)[k] = (in/g) · mean(x[k·g:(k+1)·g])            (PEFT's ``x_pooled_scaled``)
    y' = y + s · B A p(dropout(x))                      ΔW = s · (in/g²) · (B A) ⊗ 1ᵀ_g   (each column g times)

PEFT runs it on GPTQ layers only (``GPTQLoraLinear``; it refuses merging there). lora_fx runs it on every linear
target it captures, full-precision or bitsandbytes-quantized, and merges the repeated-column ΔW exactly, so an
adapter trained on a GPTQ model serves merged on the full-precision one. PEFT's draws: plain LoRA's, then A
replaced by a fresh ``nn.Linear(in/g, r)`` weight. Linear ``[out, in]`` weights with ``in`` divisible by ``g``;
not routable, fusable or combinable.

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, qalora=32), example_inputs=(ids,))
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ..errors import RuleError
from .base import Variant, dense_draws


def group_sums(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [..., in]`` summed over groups of ``group_size`` features: ``p(x) = (in/g²) · group_sums(x)``, the
    constant folded into the branch's scaling."""
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size)).sum(-1)


class Qalora(Variant):
    name = "qalora"
    label = "QA-LoRA"
    field = "use_qalora"
    routable = fusable = combinable = False
    load_hint = ("QA-LoRA's A is [r, in/g]. PEFT applies use_qalora to GPTQ layers only, so an adapter it trained on "
                 "other layers is plain LoRA: set use_qalora to false in its adapter_config.json.")

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def params(self) -> tuple:
        return (self.group_size,)

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.transposed or geometry.left:
            raise RuleError(f"QA-LoRA on {key!r}: PEFT defines it for linear layers (W [out, in]), this is a "
                            f"{kind.name}{' stored [in, out]' if kind.name == 'linear' else ''}; use plain LoRA here.")
        if geometry.in_features % self.group_size:
            raise RuleError(f"QA-LoRA on {key!r}: in_features={geometry.in_features} is not divisible by "
                            f"qalora_group_size={self.group_size}; choose a group size that divides it.")

    def shapes(self, kind, geometry, r):
        (ra, ina), shape_b = kind.shapes(geometry, r)
        return (ra, ina // self.group_size), shape_b

    @torch.no_grad()
    def reset(self, unit, init) -> bool:
        _, b = dense_draws(unit, init)
        a = torch.empty(unit.lora_A.shape)
        torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # the new nn.Linear(in/g, r)'s own draw
        unit.lora_A.copy_(a)
        unit.lora_B.copy_(b)
        return True

    def factor(self, unit) -> float:
        """``s · (in/g) / g``: the scaling with the pooling's mean and group count folded in."""
        return unit.scaling * (unit.lora_A.shape[1] / self.group_size)

    def whole_a(self, a: torch.Tensor) -> torch.Tensor:
        """A as a dense ``[r, in]`` factor of ΔW: each column repeated over its group, times ``(in/g) / g``."""
        groups = a.shape[1]
        return a.repeat_interleave(self.group_size, dim=1) * (groups / self.group_size)

    def delta(self, unit, dtype=torch.float32):
        a = self.whole_a(unit.lora_A.detach().to(dtype))
        return unit.strategy.delta(a, unit.lora_B.detach().to(dtype), unit.scaling, unit.geometry)

    def peft_config_fields(self):
        return {"use_qalora": True, "qalora_group_size": self.group_size}

    def eager(self, unit, x, context=None):
        return F.linear(F.linear(group_sums(x, self.group_size), unit.lora_A), unit.lora_B) * self.factor(unit)

    def emit(self, bb):
        x = bb.new("call_function", group_sums, (bb.activation(), self.group_size), "lora_pool")
        h = bb.new("call_function", F.linear, (x, bb.tensor("lora_A")), "lora_a")
        d = bb.new("call_function", F.linear, (h, bb.tensor("lora_B")), "lora_b")
        scaled = bb.new("call_function", operator.mul, (d, self.factor(bb.unit)), "lora_scaled")
        return bb.new("call_function", operator.add, (bb.y, scaled), "lora")
