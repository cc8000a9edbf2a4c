"""Linear targets: ``y = x Wᵀ (+ b)`` with W ``[out, in]`` (or ``[in, out]``: GPT-2's Conv1D, ``x @ W``).

LoRA branch (PEFT's layout, A ``[r, in]``, B ``[out, r]``)::

    delta = s · F.linear(F.linear(x, A), B)          ΔW = s · B A   (transposed layout: (B A)ᵀ)

Example::

    LINEAR.delta(a, b, 2.0, geometry)   # s·B A, shaped like the base weight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..bank import routing
from ..ops import dora
from .base import BiasRef, Kind


@dataclass(frozen=True)
class LinearGeometry:
    in_features: int
    out_features: int
    transposed: bool = False  # W stored [in, out] (GPT-2 Conv1D, mm/addmm forms)
    bias: BiasRef | None = None
    left: bool = False  # the weight is the left operand, ``y = W @ x`` ([out, N]): the branch is ``B @ (A @ x)``
    quant: str = ""  # a quantized base ("nf4", "fp4", "int8"; ``capture.quantized``): the weight is packed buffers
    compute_dtype: torch.dtype | None = None  # a quantized base's compute dtype (its packed weight has none)
    rows: tuple[int, int] | None = None  # the op reads rows [start, stop) of W (MHA's chunked q/k/v): B's rows too


class LinearKind(Kind):
    name = "linear"
    supports_weight_init = True

    def refusal(self, geometry, operation):
        if geometry.rows is not None and operation.startswith("routing"):
            return (f"whose ops each read a slice of the weight's rows ({geometry.rows} among them): "
                    f"{operation} is not possible; merge it or use set_adapter")
        if geometry.quant and operation == "merging":
            return (f"its base is quantized ({geometry.quant}): merging would requantize W + s·B A and lose the "
                    "update's precision. Merge onto the full-precision model instead: save_pretrained(dir), then "
                    "`lora-fx merge --base <full-precision model> --adapter dir --out merged` (or from_peft on that "
                    "model and merge_and_unload())")
        return None

    def shapes(self, geometry: LinearGeometry, r: int):
        return (r, geometry.in_features), (geometry.out_features, r)

    def delta(self, a, b, scaling, geometry):
        delta = b @ a
        return (delta.T if geometry.transposed else delta) * scaling

    def oriented(self, weight, geometry):
        return weight.T if geometry.transposed else weight

    def per_output(self, factor, geometry):
        return factor.view(1, -1) if geometry.transposed else factor.view(-1, 1)

    def emit(self, g, geometry, x, a, b, b_bias, new):
        if geometry.rows is not None:  # this op computes rows [start, stop) of W x: so does the branch
            start, stop = geometry.rows
            b = new("call_function", torch.narrow, (b, 0, start, stop - start), "lora_b_rows")
            if b_bias is not None:
                b_bias = new("call_function", torch.narrow, (b_bias, 0, start, stop - start), "lora_b_bias_rows")
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
        return new("call_function", dora.dora_linear, args, "dora")


LINEAR = LinearKind()
