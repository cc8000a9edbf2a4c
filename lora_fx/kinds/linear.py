"""Linear targets: ``y = x Wᵀ (+ b)`` with W ``[out, in]`` (or ``[in, out]``: GPT-2's Conv1D, ``x @ W``).

LoRA branch (PEFT's layout, A ``[r, in]``, B ``[out, r]``)::

    delta = s · F.linear(F.linear(x, A), B)          ΔW = s · B A   (transposed layout: (B A)ᵀ)

Example::

    LINEAR.delta(unit, torch.float32)   # s·B A, shaped like the base weight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .. import ops, routing
from .base import BiasRef, Kind


@dataclass(frozen=True)
class LinearGeometry:
    in_features: int
    out_features: int
    transposed: bool = False  # W stored [in, out] (GPT-2 Conv1D, mm/addmm forms)
    bias: BiasRef | None = None


class LinearKind(Kind):
    name = "linear"
    supports_weight_init = True

    def shapes(self, geometry: LinearGeometry, r: int):
        return (r, geometry.in_features), (geometry.out_features, r)

    def delta(self, unit, dtype):
        delta = unit.lora_B.detach().to(dtype) @ unit.lora_A.detach().to(dtype)
        return (delta.T if unit.geometry.transposed else delta) * unit.scaling

    def oriented(self, weight, geometry):
        return weight.T if geometry.transposed else weight

    def dora_factor(self, unit, weight):
        factor = unit.lora_magnitude_vector.detach().to(weight.dtype) / self.dora_norm(unit, weight)
        return factor.view(1, -1) if unit.geometry.transposed else factor.view(-1, 1)

    def emit(self, g, geometry, x, a, b, b_bias, name, new):
        h = new("call_function", F.linear, (x, a), "lora_a")
        return new("call_function", F.linear, (h, b, b_bias), "lora_b")

    def emit_routed(self, g, geometry, x, y, bank, new):
        return new("call_function", routing.routed_linear, (x, y, *bank), "lora_routed")

    def emit_dora(self, g, geometry, x, y, w, bias, params, scaling, dropout, new):
        args = (x, y, w, bias, params["lora_A"], params["lora_B"], params["lora_magnitude_vector"], scaling,
                geometry.transposed, dropout)
        return new("call_function", ops.dora_linear, args, "dora")


LINEAR = LinearKind()

