"""Linear targets: ``y = x Wᵀ (+ b)`` with W ``[out, in]`` (or ``[in, out]``: GPT-2's Conv1D, ``x @ W``).

LoRA branch (PEFT's layout, A ``[r, in]``, B ``[out, r]``)::

    delta = s · F.linear(F.linear(x, A), B)          ΔW = s · B A   (transposed layout: (B A)ᵀ)

Example::

    LINEAR.delta(unit, torch.float32)   # s·B A, shaped like the base weight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops, routing
from ..errors import RuleError
from .base import BiasRef, Kind


@dataclass(frozen=True)
class LinearGeometry:
    in_features: int
    out_features: int
    transposed: bool = False  # W stored [in, out] (GPT-2 Conv1D, mm/addmm forms)
    bias: BiasRef | None = None
    left: bool = False  # the weight is the left operand, ``y = W @ x`` ([out, N]): the branch is ``B @ (A @ x)``
    quant: str = ""  # a quantized base ("nf4", "fp4", "int8"; ``quantized``): the weight is packed buffers
    compute_dtype: torch.dtype | None = None  # a quantized base's compute dtype (its packed weight has none)


class LinearKind(Kind):
    name = "linear"
    supports_weight_init = True

    def shapes(self, geometry: LinearGeometry, r: int, slices=None):
        if slices:
            return (len(slices) * r, geometry.in_features), (sum(b - a for a, b in slices), r)
        return (r, geometry.in_features), (geometry.out_features, r)

    def check_geometry(self, key, geometry, rule):
        if geometry.quant and (rule.use_dora or rule.init in ("pissa", "olora") or str(rule.init).startswith("pissa")):
            raise RuleError(f"{'DoRA' if rule.use_dora else rule.init!r} on {key!r}: its base weight is quantized "
                            f"({geometry.quant}) and would have to be dequantized and rewritten; use plain LoRA there.")
        slices = rule.out_slices
        if slices and slices[-1][1] > geometry.out_features:
            raise RuleError(f"out_slices {slices} on {key!r}: the layer has {geometry.out_features} output features; "
                            f"use ranges within [0, {geometry.out_features}).")
        if slices and rule.r > geometry.in_features:
            raise RuleError(f"out_slices on {key!r}: r={rule.r} exceeds the layer's {geometry.in_features} input "
                            "features; use a smaller r.")
        if geometry.left and (rule.use_dora or rule.lora_bias):
            raise RuleError(f"{'DoRA' if rule.use_dora else 'lora_bias'} on {key!r}: its weight is the left operand "
                            f"of a matmul (W @ x), which PEFT's DoRA and LoRA bias do not describe; drop it for this "
                            "key.")

    def delta(self, unit, dtype):
        delta = unit.peft_B().detach().to(dtype) @ unit.lora_A.detach().to(dtype)
        return (delta.T if unit.geometry.transposed else delta) * unit.scaling

    def oriented(self, weight, geometry):
        return weight.T if geometry.transposed else weight

    def dora_factor(self, unit, weight):
        factor = unit.lora_magnitude_vector.detach().to(weight.dtype) / self.dora_norm(unit, weight)
        return factor.view(1, -1) if unit.geometry.transposed else factor.view(-1, 1)

    def emit(self, g, geometry, x, a, b, b_bias, name, new):
        if geometry.left:
            h = new("call_function", torch.matmul, (a, x), "lora_a")
            return new("call_function", torch.matmul, (b, h), "lora_b")
        h = new("call_function", F.linear, (x, a), "lora_a")
        return new("call_function", F.linear, (h, b, b_bias), "lora_b")

    def emit_routed(self, g, geometry, x, y, bank, new):
        return new("call_function", routing.routed_linear, (x, y, *bank), "lora_routed")

    def emit_dora(self, g, geometry, x, y, w, bias, params, scaling, dropout, new):
        args = (x, y, w, bias, params["lora_A"], params["lora_B"], params["lora_magnitude_vector"], scaling,
                geometry.transposed, dropout)
        return new("call_function", ops.dora_linear, args, "dora")


LINEAR = LinearKind()


def sliced_b(b: torch.Tensor, slices: tuple[tuple[int, int], ...], out_features: int) -> torch.Tensor:
    """PEFT's whole-layer B ``[out, k·r]`` for a target with output slices: slice ``i``'s rows of the packed
    ``b`` (``[Σ lenᵢ, r]``) sit at rows ``startᵢ:stopᵢ``, columns ``i·r:(i+1)·r``; zeros elsewhere, so
    ``F.linear(F.linear(x, A), B)`` adds ``Bᵢ Aᵢ x`` to slice i's outputs only and the rest get nothing.

    Example::

        sliced_b(torch.ones(6, 2), ((0, 4), (6, 8)), 8).shape    # (8, 4)
    """
    r, k = b.shape[1], len(slices)
    pieces, row, offset = [], 0, 0
    for i, (start, stop) in enumerate(slices):
        if start > row:
            pieces.append(b.new_zeros(start - row, k * r))
        pieces.append(F.pad(b[offset:offset + stop - start], (i * r, (k - 1 - i) * r)))
        offset, row = offset + stop - start, stop
    if out_features > row:
        pieces.append(b.new_zeros(out_features - row, k * r))
    return torch.cat(pieces)


def packed_b(full: torch.Tensor, slices: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The inverse of ``sliced_b``: the packed slice rows of a whole-layer B (no check of the zeros)."""
    r = full.shape[1] // len(slices)
    return torch.cat([full[start:stop, i * r:(i + 1) * r] for i, (start, stop) in enumerate(slices)])

