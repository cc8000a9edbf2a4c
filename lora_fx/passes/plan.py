"""What a derivation rewrites: the plan of branches per target key, built from a LoraModel's state.

A key's branches are either plain ones (``UnitBranch``: one adapter's unit, whatever its variant) or one routed
branch over every slot of the adapter bank (``RoutedBranch``); the passes dispatch on the type, never on a flag.
Where a block program reads an adapter tensor it records a ``Ref`` (what, which key relative to the block,
which attribute), which the block's call sites resolve to the member's own tensor.

Example::

    plan = RewritePlan({"fc1": (UnitBranch("default", unit, "lora.default.fc1"),)})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UnitBranch:
    """One adapter's branch on one key: its unit and the unit's attribute path from the graph module."""

    adapter: str
    unit: Any  # adapters.LoraUnit
    path: str

    def signature(self, base_dtype: Any) -> tuple:
        """What the branch's nodes depend on (blocks whose branches agree share one program)."""
        u = self.unit
        return (self.adapter, u.variant.signature(), u.dropout_p > 0, u.lora_A.dtype, float(u.scaling), base_dtype)


@dataclass(frozen=True)
class RoutedBranch:
    """Every slot of the adapter bank on one key: ``(adapter, unit or None, unit path or None)`` in slot order;
    the stacked tensors are ``<bank>.<stem>__A`` / ``__B`` / ``__scales`` and the per-row dropout
    ``<bank>.dropouts.<stem>``."""

    slots: tuple[tuple[str, Any, str | None], ...]
    bank: str
    stem: str
    dropout: Any = None  # the bank's per-row dropout module for this key

    def signature(self, base_dtype: Any) -> tuple:
        return ("routed", tuple((a, u is not None) for a, u, _ in self.slots), base_dtype)


@dataclass(frozen=True)
class Ref:
    """An adapter tensor a block program takes as an input: a unit's (``adapter``, ``attr``), the bank's for the key
    (``what="bank"``), or the key's merged weight copy (``what="untied"``); ``key`` is relative to the block."""

    what: str  # "unit" | "bank" | "untied"
    key: str
    attr: str
    adapter: str | None = None


@dataclass(frozen=True)
class RewritePlan:
    """Branches per full key, plus what else the graphs read from the state."""

    branches: Mapping[str, Any] = field(default_factory=dict)  # key -> tuple[UnitBranch, ...] | RoutedBranch
    fuse: bool = True
    saved: Mapping[str, str] = field(default_factory=dict)  # module path -> path of the copy read instead
    untied: Mapping[str, str] = field(default_factory=dict)  # key -> path of its merged weight's own copy
    route_default: str | None = None  # the bank's default route buffer when graphs are routed (else None)
    fused_loss: bool = False  # compute the LM loss from the hidden states (``fuse_loss``)
    tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # module path -> its trainable tokens' paths
    saved_ties: Mapping[str, str] = field(default_factory=dict)  # module path -> the saved path its weight is tied to

    @property
    def routed(self) -> bool:
        return self.route_default is not None

    def for_key(self, key: str) -> Any:
        return self.branches.get(key, ())

    def resolve(self, ref: Ref, key: str) -> str:
        """The attribute path (from the graph module) of ``ref`` for a block member whose full key is ``key``."""
        if ref.what == "untied":
            return self.untied[key]
        found = self.branches[key]
        if ref.what == "bank":
            return f"{found.bank}.{found.stem}__{ref.attr}"
        if isinstance(found, RoutedBranch):  # a slot's own unit (its gradients reach it through the routed op)
            return next(f"{path}.{ref.attr}" for a, _, path in found.slots if a == ref.adapter)
        return next(f"{b.path}.{ref.attr}" for b in found if b.adapter == ref.adapter)
