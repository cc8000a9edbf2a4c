"""The adapter store: an nn.Module registered on the graph module as ``lora``.

Layout: ``lora.<adapter>.<unit>.lora_A`` / ``.lora_B`` / ``.dropout``; one unit per target key, with
PEFT's shapes (linear: A ``[r, in]``, B ``[out, r]``). Because the store is a submodule of the graph
module, ``parameters()``, ``state_dict()``, optimisers and ``torch.compile`` see the adapters directly.

Example::

    unit = lm.adapters.unit("default", "model.layers.0.self_attn.q_proj")
    unit.lora_A.shape, unit.scaling
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .rules import Rule


class LoraUnit(nn.Module):
    """One target's adapter: ``delta = s · B A dropout(x)``, ``s = alpha/r`` (rsLoRA: ``alpha/sqrt(r)``)."""

    def __init__(
        self,
        key: str,
        kind: str,
        shape_a: tuple[int, ...],
        shape_b: tuple[int, ...],
        rule: Rule,
        *,
        dtype: torch.dtype,
        device: torch.device,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.key, self.kind = key, kind
        self.r, self.alpha, self.use_rslora = rule.r, rule.alpha, rule.use_rslora
        self.init, self.use_dora = rule.init, rule.use_dora
        self.extra = dict(extra or {})
        self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        self.dropout = nn.Dropout(rule.dropout) if rule.dropout > 0 else nn.Identity()
        self.register_parameter("lora_magnitude_vector", None)  # DoRA's m, set by init_magnitude
        if rule.lora_bias and kind == "embedding":
            raise AdapterError(f"lora_bias on {key!r}: PEFT has no LoRA bias for embeddings; drop lora_bias here.")
        self.lora_bias = rule.lora_bias
        self.lora_B_bias = (nn.Parameter(torch.zeros(shape_b[0], dtype=dtype, device=device)) if rule.lora_bias
                            else None)
        self.reset_parameters(rule.init)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = "default") -> None:  # PiSSA/OLoRA: init_schemes.svd_init
        """PEFT's init. Linear/conv: A kaiming-uniform(a=√5) (``"gaussian"``: N(0, 1/r)), B zeros.
        Embedding: A zeros, B N(0, 1). ``init=False``: both random (B nonzero; for tests)."""
        a, b = self.lora_A, self.lora_B
        if self.kind == "embedding":
            if init is False:
                a.normal_(), b.normal_()
            else:
                a.zero_(), b.normal_()
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            if self.lora_B_bias is not None:  # nn.Linear's default bias init, fan_in = r
                nn.init.uniform_(self.lora_B_bias, -1 / math.sqrt(self.r), 1 / math.sqrt(self.r))
        else:
            b.zero_()
            if self.lora_B_bias is not None:
                self.lora_B_bias.zero_()

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor, layout: str) -> None:
        """DoRA: ``m = ‖W + s·ΔW‖`` per output (row of a linear, column of an embedding table, output channel
        of a conv, in PEFT's shape for each), so the adapted layer starts equal to the base layer."""
        from .ops import dora_weight_norm  # ops imports this module

        norm = dora_weight_norm(self, weight.detach(), layout)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype))

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"key={self.key!r}, kind={self.kind}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}"


class _Units(nn.Module):
    """The units of one adapter, as children named after their keys (plus ``saved``, see _Saved)."""


class _Saved(nn.Module):
    """PEFT's ``modules_to_save``: trainable copies of whole modules, children named after their paths."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.paths: dict[str, str] = {}  # original module path -> child name
        taken: set[str] = set()
        for path, module in modules.items():
            self.paths[path] = _unit_name(path, taken)
            self.add_module(self.paths[path], module)


class AdapterStore(nn.Module):
    """All adapters of a LoraModel. ``active`` lists the adapters the graph currently computes."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []

    def add(self, name: str, units: list[LoraUnit], saved: dict[str, nn.Module] | None = None) -> None:
        check_adapter_name(name)
        if name in self._modules:
            raise AdapterError(f"Adapter {name!r} already exists; pick another adapter_name or delete it first.")
        holder = _Units()
        taken: set[str] = {"saved"}
        for unit in units:
            holder.add_module(_unit_name(unit.key, taken), unit)
        if saved:
            holder.add_module("saved", _Saved(saved))
        self.add_module(name, holder)

    def saved(self, name: str) -> dict[str, tuple[str, nn.Module]]:
        """Original module path -> (attribute path below the store, trainable copy) for adapter ``name``."""
        holder = self._holder(name)
        box = getattr(holder, "saved", None)
        if box is None:
            return {}
        return {path: (f"{name}.saved.{child}", box.get_submodule(child)) for path, child in box.paths.items()}

    def delete(self, name: str) -> None:
        self._holder(name)
        del self._modules[name]
        self.active = [a for a in self.active if a != name]

    @property
    def names(self) -> list[str]:
        return list(self._modules)

    def units(self, name: str) -> dict[str, LoraUnit]:
        """key -> unit for adapter ``name``."""
        return {u.key: u for u in self._holder(name).children() if isinstance(u, LoraUnit)}

    def unit(self, name: str, key: str) -> LoraUnit:
        units = self.units(name)
        if key not in units:
            raise AdapterError(f"Adapter {name!r} has no unit for key {key!r}.")
        return units[key]

    def unit_path(self, name: str, key: str) -> str:
        """Attribute path of the unit below the store, e.g. ``default.model_layers_0_q_proj``."""
        for child_name, unit in self._holder(name).named_children():
            if isinstance(unit, LoraUnit) and unit.key == key:
                return f"{name}.{child_name}"
        raise AdapterError(f"Adapter {name!r} has no unit for key {key!r}.")

    def iter_units(self) -> Iterator[tuple[str, LoraUnit]]:
        for name in self.names:
            for unit in self.units(name).values():
                yield name, unit

    def _holder(self, name: str) -> nn.Module:
        if name not in self._modules:
            raise AdapterError(f"No adapter named {name!r}; adapters: {self.names}.")
        return self._modules[name]


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or hasattr(AdapterStore, name):
        raise AdapterError(
            f"adapter_name {name!r} is not usable: use a Python identifier that is not an nn.Module "
            "attribute (e.g. 'default', 'task_a')."
        )


def _unit_name(key: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", key) or "unit"
    if base[0].isdigit() or hasattr(_Units, base):
        base = "m_" + base
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def unit_shapes(kind: str, in_features: int, out_features: int, r: int, extra: dict[str, Any]) -> tuple[tuple, tuple]:
    """PEFT's parameter shapes of (A, B) for a target kind."""
    if kind in ("linear", "embedding"):
        return (r, in_features), (out_features, r)
    if kind == "conv":
        return (r, in_features, *extra["kernel"]), (out_features, r, *([1] * extra["dims"]))
    raise AdapterError(f"No LoRA parameter layout for target kind {kind!r}.")
