"""Output slices (a Rule's output ranges): on a fused projection (q/k/v in one Linear) each range of output
features gets its own A ``[r, in]`` and B ``[len, r]``; the rest gets no LoRA and no gradient. The unit holds A
``[k·r, in]`` and the packed B ``[Σ len, r]``; the graph places B in PEFT's whole-layer B ``[out, k·r]``
(``sliced_b``), so saved adapters are ordinary PEFT adapters of rank ``k·r`` whose alpha keeps the scaling.
Not routable, fusable or combinable.

Example::

    sliced_b(torch.ones(6, 2), ((0, 4), (6, 8)), 8).shape    # (8, 4)
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, RuleError
from .base import Variant


def sliced_b(b: torch.Tensor, ranges: tuple[tuple[int, int], ...], out_features: int) -> torch.Tensor:
    """PEFT's whole-layer B ``[out, k·r]`` for output slices: slice ``i``'s rows of the packed ``b``
    (``[Σ lenᵢ, r]``) sit at rows ``startᵢ:stopᵢ``, columns ``i·r:(i+1)·r``; zeros elsewhere, so
    ``F.linear(F.linear(x, A), B)`` adds ``Bᵢ Aᵢ x`` to slice i's outputs only and the rest get nothing."""
    r, k = b.shape[1], len(ranges)
    pieces, row, offset = [], 0, 0
    for i, (start, stop) in enumerate(ranges):
        if start > row:
            pieces.append(b.new_zeros(start - row, k * r))
        pieces.append(F.pad(b[offset:offset + stop - start], (i * r, (k - 1 - i) * r)))
        offset, row = offset + stop - start, stop
    if out_features > row:
        pieces.append(b.new_zeros(out_features - row, k * r))
    return torch.cat(pieces)


def packed_b(full: torch.Tensor, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The inverse of ``sliced_b``: the packed slice rows of a whole-layer B (no check of the zeros)."""
    r = full.shape[1] // len(ranges)
    return torch.cat([full[start:stop, i * r:(i + 1) * r] for i, (start, stop) in enumerate(ranges)])


class Sliced(Variant):
    name = "sliced"
    label = "output slices"
    routable = fusable = combinable = False

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self.ranges = tuple(tuple(p) for p in ranges)

    def params(self) -> tuple:
        return (self.ranges,)

    @classmethod
    def metadata_key(cls) -> str:
        """The safetensors metadata key lora_fx reads the ranges back from."""
        return f"lora_fx.{cls.field}"

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear":
            raise RuleError(f"{self.field} on {key!r}: output slices apply to linear targets only (this is a "
                            f"{kind.name}); drop {self.field} from the rule for it.")
        if self.ranges[-1][1] > geometry.out_features:
            raise RuleError(f"{self.field} {self.ranges} on {key!r}: the layer has {geometry.out_features} output "
                            f"features; use ranges within [0, {geometry.out_features}).")
        if r > geometry.in_features:
            raise RuleError(f"{self.field} on {key!r}: r={r} exceeds the layer's {geometry.in_features} input "
                            "features; use a smaller r.")

    def shapes(self, kind, geometry, r):
        return (len(self.ranges) * r, geometry.in_features), (sum(b - a for a, b in self.ranges), r)

    def peft_shapes(self, kind, geometry, r):
        return {kind.peft_a: (len(self.ranges) * r, geometry.in_features),
                kind.peft_b: (geometry.out_features, len(self.ranges) * r)}

    def whole_b(self, unit, b=None):
        return sliced_b(unit.lora_B if b is None else b, self.ranges, unit.geometry.out_features)

    def peft_rank(self, unit):
        return len(self.ranges) * unit.r

    def peft_alpha(self, unit):
        """The alpha that gives PEFT's rank ``k·r`` this unit's scaling."""
        rank = self.peft_rank(unit)
        return unit.scaling * (math.sqrt(rank) if unit.use_rslora else rank)

    def peft_metadata(self, unit) -> dict[str, Any]:
        return {"slices": [list(p) for p in self.ranges], "r": unit.r, "alpha": unit.alpha}

    def saved_tensors(self, unit, tensors):
        name = unit.strategy.peft_b
        return {**tensors, name: self.whole_b(unit, tensors[name])} if name in tensors else tensors

    def loaded_tensors(self, unit, tensors, source):
        name, out = unit.strategy.peft_b, dict(tensors)
        if name not in out:
            return out
        full, want = out[name], (unit.geometry.out_features, self.peft_rank(unit))
        if tuple(full.shape) != want:
            raise CheckpointError(f"{source}: the B of {unit.key!r} has shape {tuple(full.shape)}; {unit.key!r} has "
                                  f"output slices {self.ranges} of rank {unit.r}, whose whole-layer B is {want}.")
        packed = packed_b(full, self.ranges)
        if not torch.equal(sliced_b(packed, self.ranges, want[0]), full):
            raise CheckpointError(f"{source}: the B of {unit.key!r} has values outside the output slices "
                                  f"{self.ranges}; it is a whole-layer adapter. Load it without {self.field}.")
        out[name] = packed
        return out

    def report_rows(self, unit, row):
        return [{**row, "key": f"{unit.key}[{start}:{stop}]", "out": stop - start,
                 "params": unit.r * (unit.geometry.in_features + stop - start)} for start, stop in self.ranges]

    def b_node(self, bb):
        return bb.new("call_function", sliced_b, (bb.tensor("lora_B"), self.ranges, bb.target.out_features),
                      "lora_b_slices")


def read_metadata(text: str | None) -> dict[str, dict[str, Any]]:
    """key -> {"slices", "r", "alpha"} from the safetensors metadata value ``Sliced.metadata_key()`` ({} if
    absent)."""
    return json.loads(text) if text else {}


def write_metadata(per_key: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {Sliced.metadata_key(): json.dumps(per_key, sort_keys=True)} if per_key else {}
