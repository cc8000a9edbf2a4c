"""A tied output layer's view of its embedding's adapter (PEFT's ``ensure_weight_tying``).

With tied embeddings (``lm_head.weight is embed_tokens.weight``) and LoRA on the embedding, PEFT's
``ensure_weight_tying=True`` gives the output layer the same update, so both read ``W + s·ΔW``. The embedding's
``ΔW = s · (B A)ᵀ`` (A ``[r, vocab]``, B ``[dim, r]``) seen from the head ``y = x Wᵀ`` is::

    y' = y + s · (dropout(x) @ B) @ A          (PEFT's tied lm_head: lora_A = Bᵀ, lora_B = Aᵀ, the same tensors)

``TiedView(unit)`` is the embedding's unit with this variant; the plan gives it to the head's key, so the head's
branch reads the embedding's own tensors. Not routable, fusable or combinable; it merges with its embedding.

Example::

    UnitBranch("default", TiedView(embed_unit), "lora.default.model_embed_tokens")   # on key "lm_head"
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .base import Variant


class Tied(Variant):
    name = "tied"
    label = "a tied output layer's adapter"
    routable = fusable = combinable = stacks = False

    def emit(self, bb: Any) -> fx.Node:
        x = bb.activation()
        h = bb.new("call_function", torch.matmul, (x, bb.tensor("lora_B")), "lora_a")
        delta = bb.new("call_function", torch.matmul, (h, bb.tensor("lora_A")), "lora_b")
        scaled = bb.new("call_function", operator.mul, (delta, bb.unit.scaling), "lora_scaled")
        return bb.new("call_function", operator.add, (bb.y, scaled), "lora")


TIED = Tied()


class TiedView:
    """The embedding's unit as its tied output layer's branch sees it: the same tensors, the ``TIED`` variant."""

    variant = TIED

    def __init__(self, unit: Any) -> None:
        self.unit = unit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["unit"], name)
