"""Embedding targets: ``y = W[idx]`` with W ``[num_embeddings, dim]``.

LoRA branch (PEFT's layout, A ``[r, num]`` initialised to zeros, B ``[dim, r]`` normal; no dropout and no
cast on indices)::

    delta = s · F.embedding(idx, Aᵀ, padding_idx) @ Bᵀ          ΔW = s · (B A)ᵀ

Example::

    EMBEDDING.shapes(EmbeddingGeometry(40, 16, padding_idx=0), r=4)   # (4, 40), (16, 4)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..bank import routing
from ..ops import dora
from .base import Kind


@dataclass(frozen=True)
class EmbeddingGeometry:
    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None

    @property
    def in_features(self) -> int:
        return self.num_embeddings

    @property
    def out_features(self) -> int:
        return self.embedding_dim


class EmbeddingKind(Kind):
    name = "embedding"
    peft_a = "lora_embedding_A"
    peft_b = "lora_embedding_B"
    reads_activation = False
    supports_bias = False

    def shapes(self, geometry: EmbeddingGeometry, r: int):
        return (r, geometry.num_embeddings), (geometry.embedding_dim, r)

    @torch.no_grad()
    def reset(self, unit, init):
        """PEFT's embedding init with PEFT's draws: A and B drawn N(0, 1) on the CPU in float32 (``init=False``
        keeps them); then A zeroed and B drawn again."""
        a = torch.randn(unit.lora_A.shape)
        b = torch.randn(unit.lora_B.shape)
        if init is not False:
            a.zero_()
            b.normal_()
        unit.lora_A.copy_(a)
        unit.lora_B.copy_(b)

    def delta(self, a, b, scaling, geometry):
        return (b @ a).T * scaling

    def oriented(self, weight, geometry):
        return weight.T

    def per_output(self, factor, geometry):
        return factor.view(1, -1)

    def emit(self, g, geometry, idx, a, b, b_bias, new):
        a_t = new("call_method", "t", (a,), "lora_A_t")
        b_t = new("call_method", "t", (b,), "lora_B_t")
        h = new("call_function", F.embedding, (idx, a_t), "lora_a", {"padding_idx": geometry.padding_idx})
        return new("call_function", operator.matmul, (h, b_t), "lora_b")

    def emit_routed(self, g, geometry, idx, y, bank, new):
        return new("call_function", routing.routed_embedding, (idx, y, *bank, geometry.padding_idx), "lora_routed")

    def emit_dora(self, g, geometry, x, y, w, bias, params, scaling, dropout, new):
        args = (x, y, w, params["lora_A"], params["lora_B"], params["lora_magnitude_vector"], scaling,
                geometry.padding_idx)
        return new("call_function", dora.dora_embedding, args, "dora")


EMBEDDING = EmbeddingKind()
