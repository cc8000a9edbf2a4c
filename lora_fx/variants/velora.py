"""VeLoRA (PEFT's ``velora_config``): plain LoRA's forward, with A's gradient computed from compressed activations.
In training, each token's input ``x`` (after dropout) is cut into ``g = num_groups`` sub-tokens of ``d = ⌈in/g⌉``
features (zero-padded) and each sub-token is kept only as its projection on one unit vector ``v`` (PEFT's
``lora_velora_embed``)::

    forward:   h = A x                         saved: c[t, j] = ⟨x[t, j·d:(j+1)·d], v⟩   (g numbers per token)
    backward:  ∂L/∂A = (∂L/∂h)ᵀ x̂,  x̂[t] = scale · (c[t, :] ⊗ v)[:in]         ∂L/∂x exact

``init_type``: ``"batch_average"`` sets ``v`` to the normalised mean sub-token of every training batch,
``"batch_average_once"`` of the first one, ``"random"`` draws it once at init (``randn``, normalised). In eval
(or without grad) the branch is plain LoRA's. The unit's dropout module becomes a ``VeloraInput`` (it follows
``train()`` / ``eval()`` and holds ``v``), so the graph calls it with ``(x, A)``. Linear ``[out, in]`` weights;
merges as plain LoRA; not routable, fusable or combinable.

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, velora=(64, 1.0, "batch_average")), example_inputs=(ids,))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RuleError
from .base import Variant

INIT_TYPES = ("batch_average", "batch_average_once", "random")


def group_dim(in_features: int, num_groups: int) -> int:
    return -(-in_features // num_groups)


def sub_tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``x [..., in]`` as ``[tokens, g, d]`` (zero-padded to ``g·d`` features)."""
    d = group_dim(x.shape[-1], num_groups)
    x = F.pad(x, (0, num_groups * d - x.shape[-1])) if x.shape[-1] != num_groups * d else x
    return x.reshape(-1, num_groups, d)


def unit_vector(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


class _CompressedLinear(torch.autograd.Function):
    """``F.linear(x, A)`` saving ``c = sub_tokens(x) · v`` instead of ``x`` for A's gradient."""

    @staticmethod
    def forward(ctx, x, a, v, num_groups: int, scale: float):
        ctx.shape, ctx.x_dtype, ctx.in_features, ctx.scale = tuple(x.shape), x.dtype, x.shape[-1], scale
        ctx.save_for_backward(torch.einsum("tgd,d->tg", sub_tokens(x, num_groups), v.to(x.dtype)), a, v)
        return F.linear(x, a)

    @staticmethod
    def backward(ctx, grad):
        c, a, v = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ a.to(g.dtype)).reshape(ctx.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (c.to(g.dtype).unsqueeze(-1) * v.to(g.dtype).view(1, 1, -1)).reshape(c.shape[0], -1)
            grad_a = (g.T @ (rebuilt[:, :ctx.in_features] * ctx.scale)).to(a.dtype)
        return grad_x, grad_a, None, None, None


class VeloraInput(nn.Module):
    """A VeLoRA unit's input side: its dropout, then ``A x`` (compressed for backward in training). Holds ``v``."""

    def __init__(self, dropout: nn.Module, in_features: int, num_groups: int, scale: float, init_type: str,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.drop, self.num_groups, self.scale, self.init_type = dropout, num_groups, scale, init_type
        self.p = float(getattr(dropout, "p", 0.0))
        d = group_dim(in_features, num_groups)
        if init_type == "random":
            v = unit_vector(torch.randn(d, device=device, dtype=dtype)).to(dtype)
        else:
            v = torch.zeros(d, device=device, dtype=dtype)
        self.register_buffer("embed", v)
        self.initialized = init_type == "random"

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, a)
        if self.init_type == "batch_average" or not self.initialized:
            with torch.no_grad():
                mean = sub_tokens(x.detach(), self.num_groups).reshape(-1, self.embed.shape[0]).mean(dim=0)
                self.embed.copy_(unit_vector(mean).to(self.embed.dtype))
            self.initialized = True
        return _CompressedLinear.apply(x, a, self.embed, self.num_groups, self.scale)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, scale={self.scale}, init_type={self.init_type!r}, p={self.p}"


class Velora(Variant):
    name = "velora"
    label = "VeLoRA"
    field = "velora_config"
    routable = fusable = combinable = False

    def __init__(self, num_groups: int, scale: float, init_type: str) -> None:
        self.num_groups, self.scale, self.init_type = num_groups, scale, init_type

    def params(self) -> tuple:
        return (self.num_groups, self.scale, self.init_type)

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.transposed or geometry.left or geometry.quant:
            raise RuleError(f"VeLoRA on {key!r}: PEFT defines it for nn.Linear weights [out, in] (this is a "
                            f"{kind.name}{' with a quantized base' if geometry.quant else ''}); use plain LoRA here.")

    @torch.no_grad()
    def init(self, unit, weight):
        unit.dropout = VeloraInput(unit.dropout, unit.geometry.in_features, self.num_groups, self.scale,
                                   self.init_type, weight.dtype, weight.device)

    def peft_shapes(self, kind, geometry, r):
        return {**super().peft_shapes(kind, geometry, r),
                "lora_velora_embed": (group_dim(geometry.in_features, self.num_groups),)}

    def peft_tensors(self, unit):
        return {**super().peft_tensors(unit), "lora_velora_embed": unit.dropout.embed}

    def peft_config_fields(self):
        return {"velora_config": {"num_groups": self.num_groups, "scale": self.scale, "init_type": self.init_type}}

    def emit(self, bb):
        return self.emit_through_input(bb, "lora_velora")
