"""KaSA (knowledge-aware singular-value adaptation, PEFT's ``kasa_config``): at init the base weight drops its r
smallest singular components, and a learned diagonal ``d`` (PEFT's ``lora_diag``, drawn ``randn(r)``) sits between
A and B::

    W = U S Vᵀ,  W ← U[:, :k-r] S[:k-r] V[:, :k-r]ᵀ  (k = min(in, out); written once, as PiSSA writes its residual)
    y' = y + s · B (d ⊙ A dropout(x))              ΔW = s · (B diag(d)) A

B starts at zero, so outputs start as the truncated base's. The paper's regularizer (``regularization``; summed
by ``lm.variant_loss()`` / PEFT's ``_get_kasa_loss()``) is ``beta · ‖d‖² + gamma · (‖BᵀB - I‖_F + ‖AAᵀ - I‖_F)``.
Linear ``[out, in]`` weights only (PEFT refuses Conv1D, embeddings and convs); not routable, fusable or
combinable; a KaSA adapter cannot share a model with non-KaSA adapters (PEFT refuses the mix: each truncates W).

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, kasa=True), example_inputs=(ids,))
    loss = task_loss + lm.variant_loss()
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RuleError
from .base import Variant


class Kasa(Variant):
    name = "kasa"
    label = "KaSA"
    field = "kasa_config"
    routable = fusable = combinable = False
    exclusive = True

    def __init__(self, beta: float, gamma: float) -> None:
        self.beta, self.gamma = beta, gamma

    def params(self) -> tuple:
        return (self.beta, self.gamma)




    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.transposed or geometry.left or geometry.quant:
            raise RuleError(f"KaSA on {key!r}: PEFT defines it for nn.Linear weights [out, in] (this is a "
                            f"{kind.name}{' with a quantized base' if geometry.quant else ''}); use plain LoRA here.")
        k = min(geometry.in_features, geometry.out_features)
        if r >= k:
            raise RuleError(f"KaSA on {key!r} needs r < min(in, out) = {k} (it keeps the k - r largest singular "
                            f"components of W), got r={r}.")

    def extra_parameters(self, kind, geometry, dtype, device):
        return {"lora_diag": None}  # drawn by ``init``, after A and B (PEFT's order)

    @torch.no_grad()
    def init(self, unit, weight):
        unit.lora_diag = nn.Parameter(torch.randn(unit.r, device=unit.lora_A.device, dtype=unit.lora_A.dtype))

    @torch.no_grad()
    def residual(self, unit, weight, source=None):
        u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
        keep = s.shape[0] - unit.r
        return ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)

    def delta(self, unit, dtype=torch.float32):
        a, b = unit.lora_A.detach().to(dtype), unit.lora_B.detach().to(dtype)
        return unit.strategy.delta(a, b * unit.lora_diag.detach().to(dtype), unit.scaling, unit.geometry)

    def peft_shapes(self, kind, geometry, r):
        return {**super().peft_shapes(kind, geometry, r), "lora_diag": (r,)}

    def peft_tensors(self, unit):
        return {**super().peft_tensors(unit), "lora_diag": unit.lora_diag}

    def peft_config_fields(self):
        return {"kasa_config": {"beta": self.beta, "gamma": self.gamma}}

    def regularization(self, unit) -> torch.Tensor:
        d, a, b = unit.lora_diag.float(), unit.lora_A.float(), unit.lora_B.float()
        eye = torch.eye(unit.r, device=d.device)
        orthogonal = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
        return self.beta * (d ** 2).sum() + self.gamma * orthogonal

    def eager_a(self, unit, x):
        return F.linear(x, unit.lora_A) * unit.lora_diag

    def emit(self, bb):
        x = bb.activation()
        h = bb.new("call_function", F.linear, (x, bb.tensor("lora_A")), "lora_a")
        h = bb.new("call_function", operator.mul, (h, bb.tensor("lora_diag")), "lora_diag")
        d = bb.new("call_function", F.linear, (h, bb.tensor("lora_B")), "lora_b")
        scaled = bb.new("call_function", operator.mul, (d, bb.unit.scaling), "lora_scaled")
        return bb.new("call_function", operator.add, (bb.y, scaled), "lora")
