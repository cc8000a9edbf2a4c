"""The adapter store: an nn.Module registered on the graph module as ``lora``; all per-adapter state lives here.

Layout: ``lora.<adapter>.<unit>.lora_A`` / ``.lora_B`` / ``.dropout``; one unit per target key, with PEFT's
shapes (linear: A ``[r, in]``, B ``[out, r]``). Each adapter's entry also holds its PEFT options (``bias``),
the rules that matched nothing, and the trainable copies of ``modules_to_save``. Because the store is a
submodule of the graph module, ``parameters()``, ``state_dict()``, optimisers and ``torch.compile`` see the
adapters directly.

Example::

    unit = lm.adapters.unit("default", "model.layers.0.self_attn.q_proj")
    unit.lora_A.shape, unit.scaling, unit.delta_weight()
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .errors import AdapterError, RuleError
from .kinds import Kind
from .kinds.linear import sliced_b
from .passes.common import BANK
from .rules import Rule


class LoraUnit(nn.Module):
    """One target's adapter: ``delta = s · B A dropout(x)``, ``s = alpha/r`` (rsLoRA: ``alpha/sqrt(r)``)."""

    def __init__(self, key: str, strategy: Kind, geometry: Any, rule: Rule, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        strategy.check(key, rule.use_dora, rule.lora_bias, rule.init)
        strategy.check_geometry(key, geometry, rule)
        sizes = (geometry.in_features, geometry.out_features)
        if rule.r > max(sizes):  # checked before allocating: a huge r from a small config file never allocates
            raise RuleError(f"Rule {rule.label}: r={rule.r} on {key!r} exceeds both its feature sizes {sizes}, so it "
                            f"cannot add rank; use r <= {max(sizes)} (or rank_pattern for this key).")
        self.key, self.strategy, self.geometry = key, strategy, geometry
        self.r, self.alpha, self.use_rslora = rule.r, rule.alpha, rule.use_rslora
        self.init, self.use_dora, self.lora_bias = rule.init, rule.use_dora, rule.lora_bias
        self.slices = rule.out_slices  # output ranges, each with its own A rows and B block (None: whole layer)
        shape_a, shape_b = strategy.shapes(geometry, rule.r, self.slices) if self.slices else strategy.shapes(
            geometry, rule.r)
        self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        self.dropout = nn.Dropout(rule.dropout) if rule.dropout > 0 else nn.Identity()
        self.register_parameter("lora_magnitude_vector", None)  # DoRA's m, set by init_magnitude
        self.routed = False  # its A and B are views of an adapter bank's slot, padded to the bank's rank
        self.lora_B_bias = (nn.Parameter(torch.zeros(shape_b[0], dtype=dtype, device=device)) if rule.lora_bias
                            else None)
        self.reset_parameters(rule.init)

    @property
    def kind(self) -> str:
        return self.strategy.name

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def peft_r(self) -> int:
        """The rank PEFT sees: ``k·r`` for ``k`` output slices (one whole-layer adapter), else r."""
        return len(self.slices) * self.r if self.slices else self.r

    @property
    def peft_alpha(self) -> float:
        """The alpha that gives PEFT's rank ``peft_r`` this unit's scaling."""
        if not self.slices:
            return self.alpha
        return self.scaling * (math.sqrt(self.peft_r) if self.use_rslora else self.peft_r)

    def peft_B(self) -> torch.Tensor:
        """B in PEFT's whole-layer shape ``[out, peft_r]`` (``kinds.linear.sliced_b`` for output slices)."""
        if not self.slices:
            return self.lora_B
        return sliced_b(self.lora_B, self.slices, self.geometry.out_features)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def reset_parameters(self, init: bool | str = "default") -> None:
        """PEFT's init for this kind (PiSSA/OLoRA: ``init_schemes.svd_init``, which needs the base weight)."""
        self.strategy.reset(self, init)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · ΔW`` in ``dtype``, in the base weight's layout and shape."""
        return self.strategy.delta(self, dtype)

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        """DoRA: ``m = ‖W + s·ΔW‖`` per output (PEFT's shape), so the adapted layer starts equal to the base."""
        norm = self.strategy.dora_norm(self, weight.detach())
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype))

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        slices = f", out_slices={self.slices}" if self.slices else ""
        return (f"key={self.key!r}, kind={self.kind}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
                f"{dora}{slices}")


class _Saved(nn.Module):
    """PEFT's ``modules_to_save``: trainable copies of whole modules, children named after their paths."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.paths: dict[str, str] = {}  # original module path -> child name
        taken: set[str] = set()
        for path, module in modules.items():
            self.paths[path] = _child_name(path, taken, type(self))
            self.add_module(self.paths[path], module)


class AdapterEntry(nn.Module):
    """One adapter: its units (children named after their keys), ``saved`` copies, and PEFT options."""

    def __init__(self, units: list[LoraUnit], saved: Mapping[str, nn.Module] | None, bias: str,
                 unused_rules: list[str]) -> None:
        super().__init__()
        self.bias, self.unused_rules = bias, list(unused_rules)
        self.trainable = True  # load_adapter(..., is_trainable=False) keeps an active adapter frozen
        self.svd_error: dict[str, float] = {}  # add_weighted_adapter's SVD types: key -> relative error
        self.by_key: dict[str, LoraUnit] = {}
        self.child: dict[str, str] = {}  # key -> child name
        taken = {"saved"}
        for unit in units:
            self.child[unit.key] = _child_name(unit.key, taken, type(self))
            self.add_module(self.child[unit.key], unit)
            self.by_key[unit.key] = unit
        if saved:
            self.add_module("saved", _Saved(saved))


class AdapterStore(nn.Module):
    """All adapters of a LoraModel. ``active`` lists the adapters the graph computes."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []

    @property
    def bank(self):
        """The adapter bank (``bank.AdapterBank``) when adapters are routed per row, else None."""
        return self._modules.get(BANK)

    def add(self, name: str, entry: AdapterEntry) -> None:
        check_adapter_name(name)
        if name in self._modules:
            raise AdapterError(f"Adapter {name!r} already exists; pick another adapter_name or delete it first.")
        self.add_module(name, entry)

    def delete(self, name: str) -> None:
        self.entry(name)
        del self._modules[name]
        self.active = [a for a in self.active if a != name]

    @property
    def names(self) -> list[str]:
        return [n for n in self._modules if n != BANK]

    def entry(self, name: str) -> AdapterEntry:
        if name not in self._modules or name == BANK:
            raise AdapterError(f"No adapter named {name!r}; adapters: {self.names}.")
        return self._modules[name]

    def units(self, name: str) -> Mapping[str, LoraUnit]:
        """key -> unit for adapter ``name`` (a read-only view)."""
        return MappingProxyType(self.entry(name).by_key)

    def unit(self, name: str, key: str) -> LoraUnit:
        units = self.entry(name).by_key
        if key not in units:
            raise AdapterError(f"Adapter {name!r} has no unit for key {key!r}.")
        return units[key]

    def unit_path(self, name: str, key: str) -> str:
        """Attribute path of the unit below the store, e.g. ``default.model_layers_0_q_proj``."""
        entry = self.entry(name)
        if key not in entry.child:
            raise AdapterError(f"Adapter {name!r} has no unit for key {key!r}.")
        return f"{name}.{entry.child[key]}"

    def iter_units(self) -> Iterator[tuple[str, LoraUnit]]:
        for name in self.names:
            for unit in self.entry(name).by_key.values():
                yield name, unit

    def saved(self, name: str) -> dict[str, tuple[str, nn.Module]]:
        """Original module path -> (attribute path below the store, trainable copy) for adapter ``name``."""
        box = getattr(self.entry(name), "saved", None)
        if box is None:
            return {}
        return {path: (f"{name}.saved.{child}", box.get_submodule(child)) for path, child in box.paths.items()}


def adapter_dtype(base: torch.dtype, autocast: bool) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: fp16/bf16 base weights get float32 adapters."""
    return torch.float32 if autocast and base in (torch.float16, torch.bfloat16) else base


_RESERVED: set[str] = set()


def check_adapter_name(name: str) -> None:
    """An adapter name is an identifier of at most 100 characters that no attribute of the store uses (it is a
    submodule name and, for PEFT's layout, a directory name); ``__base__`` means "no adapter"."""
    if not _RESERVED:
        _RESERVED.update(dir(AdapterStore()), {"__base__", BANK})
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 100 or name in _RESERVED:
        raise AdapterError(
            f"adapter_name {name!r} is not usable: use a Python identifier of at most 100 characters that is not "
            "an nn.Module attribute (e.g. 'default', 'task_a')."
        )


def _child_name(key: str, taken: set[str], owner: type) -> str:
    base = re.sub(r"\W", "_", key) or "unit"
    if base[0].isdigit() or hasattr(owner, base):
        base = "m_" + base
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
