"""Activated LoRA (PEFT's ``alora_invocation_tokens``): the adapter acts only from the last occurrence of an
invocation token sequence in each row on; tokens before it see the base model (so their KV cache is the base
model's)::

    y' = y + m ⊙ s · B A dropout(x),   m[b, t] = t >= start of the last invocation in row b (0 if none)

The mask is computed in the graph from the call's ``input_ids`` (``ops.invocation``); a call without
``input_ids`` runs the base model, as PEFT does. ``lm.generate`` runs the model's own generate (``generation.eager``)
with PEFT's offsets taken from the prompt, so every generated token uses the adapter once the prompt invoked it.
Linear targets; not mergeable (the mask depends on the tokens: PEFT refuses too), routable, fusable or combinable.

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, alora=(31, 7)), example_inputs=(ids,))
"""

from __future__ import annotations

import operator

import torch

from ..errors import AdapterError, MergeError, RuleError
from ..ops.invocation import invocation_mask, masked_rows
from .base import Variant


class Alora(Variant):
    name = "alora"
    label = "aLoRA"
    field = "alora_invocation_tokens"
    routable = fusable = combinable = stacks = decodes = False

    def __init__(self, tokens: tuple[int, ...]) -> None:
        self.tokens = tuple(tokens)

    def params(self) -> tuple:
        return (self.tokens,)





    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.left:
            raise RuleError(f"aLoRA on {key!r}: PEFT defines it for linear layers (this is a {kind.name}).")

    def delta(self, unit, dtype=torch.float32):
        raise MergeError(f"{unit.key!r} has an aLoRA adapter, active only after its invocation tokens: no single "
                         "weight represents it (PEFT does not merge aLoRA either).")

    def peft_config_fields(self):
        return {"alora_invocation_tokens": list(self.tokens)}

    def eager(self, unit, x, context=None):
        delta = super().eager(unit, x)
        ids = (context or {}).get("input_ids")
        if ids is None:
            return delta * 0
        offsets = context.setdefault(("alora", self.tokens), _offsets(ids, self.tokens))
        rows, length = x.shape[0], x.shape[1] if x.dim() == 3 else 1
        if rows != offsets.shape[0]:
            raise AdapterError(f"aLoRA on {unit.key!r}: the generation runs {rows} rows for {offsets.shape[0]} "
                               "prompts (beam search or several returned sequences), which PEFT does not support for "
                               "aLoRA yet either; generate greedily or by sampling.")
        mask = torch.arange(length, device=x.device) >= (length - offsets.clamp(max=length)).unsqueeze(1)
        return masked_rows(delta, mask)

    def emit(self, bb):
        x = bb.activation()
        delta = bb.kind.emit_at(bb.graph, bb.geometry, bb.node, x, bb.tensor("lora_A"), bb.tensor("lora_B"), None,
                                bb.new)
        scaled = bb.new("call_function", operator.mul, (delta, bb.unit.scaling), "lora_scaled")
        masked = bb.new("call_function", masked_rows, (scaled, bb.inputs.invocation_mask(self.tokens)), "lora_alora")
        return bb.new("call_function", operator.add, (bb.y, masked), "lora")


def _offsets(ids: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """PEFT's ``alora_offsets``: per row, how many tokens from the end the last invocation starts (0: none)."""
    mask = invocation_mask(ids, tokens)
    return mask.sum(-1)
