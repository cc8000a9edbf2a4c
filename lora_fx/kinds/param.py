"""Parameter targets (PEFT's ``target_parameters``): LoRA on a weight the model reads itself, above all the 3-D
expert stacks of mixture-of-experts layers (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).

PEFT's layout for E experts of rank r: A ``[r·E, in]``, B ``[out, r·E]``; expert e owns rows ``e·r : (e+1)·r`` of A
and columns ``e, e+E, e+2E, ...`` of B, so with ``A_e = A.view(E, r, in)[e]`` and ``B_e = B.view(out, r, E)[:, :, e]``::

    ΔW[e] = s · B_e A_e        (a weight stored [E, in, out], ``is_transposed``: (B_e A_e)ᵀ)

A 2-D weight is E = 1 with ``in = W.shape[1]``, ``out = W.shape[0]`` whatever the op does with it. The graph
branch adds, for each token, only its own expert's ``s · B_e A_e x``: the op form decides how (``index``: the op
reads ``W[e]`` for a fixed e; ``gather``: ``bmm`` over ``W[ids]``; ``grouped``: a grouped matmul over tokens sorted
by expert, with the same offsets). Nothing the size of the expert stack is built.

Example::

    g = ParamGeometry(experts=8, in_features=64, out_features=128, form="grouped")
    PARAM.shapes(g, r=4)          # (32, 64), (128, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.grouped import grouped_mm
from .base import Kind

FORMS = ("linear", "index", "gather", "grouped")


@dataclass(frozen=True)
class ParamGeometry:
    experts: int  # E (1 for a 2-D weight)
    in_features: int  # PEFT's in: the columns of A
    out_features: int  # PEFT's out: the rows of B
    form: str = "index"  # how the op reads the weight (FORMS)
    stored_t: bool = False  # W[e] is stored [in, out] (ΔW[e] = (B_e A_e)ᵀ); False: [out, in]
    use_t: bool = False  # the op contracts x with W[e]'s first dim (``x @ W[e]``); False: ``F.linear(x, W[e])``
    index: int | None = None  # form "index": the expert this op reads
    weight_at: int = 1  # forms "gather" / "grouped": the base op's argument holding the (gathered) weight

    @property
    def swapped(self) -> bool:
        """The op contracts x with PEFT's ``out`` (a 2-D ``x @ W`` with W stored [in, out]): the branch applies
        B first, ``x B A``."""
        return self.stored_t != self.use_t


class ParamKind(Kind):
    name = "param"
    explicit = True  # only rules naming this kind (or PEFT's target_parameters) reach it
    supports_bias = False
    supports_dora = False

    def refusal(self, geometry, operation):
        if operation == "merging":
            return None  # routing, hot swaps and weighted combinations are refused
        return f"LoRA on a parameter (PEFT's target_parameters) does not support {operation}; use set_adapter"

    def shapes(self, geometry: ParamGeometry, r: int):
        return (r * geometry.experts, geometry.in_features), (geometry.out_features, r * geometry.experts)

    def delta(self, a, b, scaling, geometry):
        e = geometry.experts
        if e == 1:
            return (b @ a) * scaling
        a3, b3 = a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1)
        delta = b3 @ a3  # [E, out, in]
        return (delta.transpose(1, 2) if geometry.stored_t else delta) * scaling

    def oriented(self, weight, geometry):
        return weight

    # ---- graph -------------------------------------------------------------------------------------------
    def emit(self, g, geometry, x, a, b, b_bias, new):
        return self.emit_at(g, geometry, None, x, a, b, b_bias, new)

    def emit_at(self, g, geometry, node, x, a, b, b_bias, new):
        e = geometry.experts
        a3 = new("call_method", "view", (a, e, -1, geometry.in_features), "lora_a3")  # [E, r, in]
        b3 = new("call_method", "view", (b, geometry.out_features, -1, e), "lora_b3")
        b3 = new("call_method", "permute", (b3, 2, 0, 1), "lora_b3e")  # [E, out, r]
        first, second = a3, b3  # [E, r, contracted], [E, produced, r]
        if geometry.swapped:
            first = new("call_method", "transpose", (b3, 1, 2), "lora_first")
            second = new("call_method", "transpose", (a3, 1, 2), "lora_second")
        if geometry.form == "gather":
            w = node.args[geometry.weight_at]  # W[ids]: aten.index(W, [ids]) or getitem(W, ids)
            ids = w.args[1][0] if isinstance(w.args[1], (list, tuple)) else w.args[1]
            return _gather(geometry, x, first, second, new, ids)
        if geometry.form == "grouped":
            offsets = node.args[2] if len(node.args) > 2 else node.kwargs["offs"]
            return _grouped(geometry, x, first, second, new, offsets)
        return _index(geometry, x, first, second, new)


def _index(geometry, x, first, second, new):
    """``F.linear(x, W[e])`` / ``x @ W[e]`` for a fixed e: ``F.linear(F.linear(x, first[e]), second[e])``."""
    e = geometry.index or 0
    f = new("call_function", torch.select, (first, 0, e), "lora_first_e")
    s = new("call_function", torch.select, (second, 0, e), "lora_second_e")
    h = new("call_function", F.linear, (x, f), "lora_a")
    return new("call_function", F.linear, (h, s), "lora_b")


def _gather(geometry, x, first, second, new, ids):
    """``bmm(W[ids], x)`` (x ``[S, in, 1]``) or ``bmm(x, W[ids])`` (x ``[S, 1, in]``): each row's own expert's factors,
    gathered (``[S, r, in]``, the rank's share of what the base gathers)."""
    f = new("call_function", torch.index_select, (first, 0, ids), "lora_first_rows")
    s = new("call_function", torch.index_select, (second, 0, ids), "lora_second_rows")
    if geometry.use_t:  # row vectors: x [S, 1, in] @ first[ids]ᵀ -> [S, 1, r] @ second[ids]ᵀ
        f = new("call_method", "transpose", (f, 1, 2), "lora_first_t")
        s = new("call_method", "transpose", (s, 1, 2), "lora_second_t")
        h = new("call_function", torch.bmm, (x, f), "lora_a")
        return new("call_function", torch.bmm, (h, s), "lora_b")
    h = new("call_function", torch.bmm, (f, x), "lora_a")
    return new("call_function", torch.bmm, (s, h), "lora_b")


def _grouped(geometry, x, first, second, new, offsets):
    """``grouped_mm(x, Wᵀ, offsets)`` over tokens grouped by expert: ``ops.grouped.grouped_mm`` with the factors,
    ``[E, in, r]`` then ``[E, r, out]``, and the same offsets."""
    op = grouped_mm
    f = new("call_method", "transpose", (first, 1, 2), "lora_first_t")
    s = new("call_method", "transpose", (second, 1, 2), "lora_second_t")
    h = new("call_function", op, (x, f, offsets), "lora_a")
    return new("call_function", op, (h, s, offsets), "lora_b")


PARAM = ParamKind()
