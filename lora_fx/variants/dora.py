"""DoRA (weight-decomposed LoRA), as PEFT computes it: a magnitude vector ``m`` (one entry per output, initialised to
``‖W + s·ΔW‖``) rescales the adapted weight's direction::

    n = ‖W + s·B A‖ per output (detached);  k = m / n
    y' = y + (k - 1) · (W x) + k · s · B A dropout(x)          W' = k · (W + s·B A)   (merged)

Not routable, fusable or combinable, and it merges alone (one adapter per key); its adapter must be in the base
weight's dtype.

Example::

    unit.variant is DORA and unit.lora_magnitude_vector.shape    # (out,)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError, RuleError
from .base import Variant


class DoRA(Variant):
    name = "dora"
    label = "DoRA"
    routable = fusable = combinable = stacks = casts_output = False

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if not kind.supports_dora:
            raise RuleError(f"DoRA on {key!r}: PEFT has no DoRA for a {kind.name}; drop {self.field} here.")
        if getattr(geometry, "quant", ""):
            raise RuleError(f"'DoRA' on {key!r}: its base weight is quantized ({geometry.quant}) and would have to be "
                            "dequantized and rewritten; use plain LoRA there.")
        if getattr(geometry, "left", False):
            raise RuleError(f"DoRA on {key!r}: its weight is the left operand of a matmul (W @ x), which PEFT's DoRA "
                            "does not describe; drop it for this key.")

    def extra_parameters(self, kind, geometry, dtype, device):
        return {"lora_magnitude_vector": None}  # set by ``init`` from W

    @torch.no_grad()
    def init(self, unit, weight):
        if unit.lora_A.dtype != weight.dtype:
            raise AdapterError(f"DoRA on {unit.key!r} needs adapters in the base weight's dtype ({weight.dtype}); "
                               "pass autocast_adapter_dtype=False.")
        norm = self._norm(unit, weight.detach())
        unit.lora_magnitude_vector = nn.Parameter(norm.to(unit.lora_A.dtype))

    def _norm(self, unit, weight: torch.Tensor) -> torch.Tensor:
        """``‖W + s·ΔW‖`` per output, detached, in PEFT's shape for ``lora_magnitude_vector``."""
        return unit.strategy.norm(weight + self.delta(unit, weight.dtype), unit.geometry).detach()

    def merge_factor(self, unit, weight):
        factor = unit.lora_magnitude_vector.detach().to(weight.dtype) / self._norm(unit, weight)
        return unit.strategy.per_output(factor, unit.geometry)

    def peft_tensors(self, unit):
        return {**super().peft_tensors(unit), "lora_magnitude_vector": unit.lora_magnitude_vector}

    def eager_refusal(self, unit):
        return (f"DoRA on {unit.key!r}: transformers' generate path adds LoRA branches to layer outputs, which "
                "DoRA's rescaled weight is not. Use lm.generate's own arguments (greedy, sampling), or merge first "
                "(lm.merge()).")

    def emit(self, bb):
        unit, t = bb.unit, bb.target
        if unit.lora_A.dtype != bb.base_dtype:
            raise AdapterError(f"DoRA on {t.key!r} needs the adapter in the base weight's dtype ({bb.base_dtype}); "
                               "lorafy with autocast_adapter_dtype=False.")
        params = {name: bb.tensor(name) for name in ("lora_A", "lora_B", "lora_magnitude_vector")}
        w, bias = bb.weight(), bb.bias()
        dropout = bb.new("get_attr", bb.dropout_path(), (), "lora_dropout") if unit.dropout_p > 0 else None
        return bb.kind.emit_dora(bb.graph, bb.geometry, bb.x, bb.y, w, bias, params, float(unit.scaling), dropout,
                                 bb.new)


DORA = DoRA()
