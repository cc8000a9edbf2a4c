"""A unit: one target's adapter in one adapter, ``delta = s · B A dropout(x)`` with ``s = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``), PEFT's shapes for its kind (linear: A ``[r, in]``, B ``[out, r]``), and the variant that says
what else it is (``variants``).

Example::

    unit = lm.adapters.unit("default", "model.layers.0.self_attn.q_proj")
    unit.lora_A.shape, unit.scaling, unit.delta_weight()
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ..errors import RuleError
from ..kinds import Kind
from ..variants import Variant, resolve
from ..variants.inits import check_target, orthogonal_init, random_part


def _mem_available() -> int | None:
    """The host's MemAvailable (Linux), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            line = next((line for line in f if line.startswith("MemAvailable:")), None)
        return int(line.split()[1]) * 1024 if line else None
    except (OSError, ValueError, IndexError):
        return None


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` can still give (free GPU memory; the host's MemAvailable, else its total): what
    one allocation may take at most."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _mem_available()
    if available is not None:
        return available
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class LoraUnit(nn.Module):
    """One target's adapter. ``strategy`` is its kind (``kinds``), ``variant`` its variant (``variants``)."""

    def __init__(self, key: str, strategy: Kind, geometry: Any, rule: Any, *, dtype: torch.dtype,
                 device: torch.device, variant: Variant | None = None) -> None:
        super().__init__()
        variant = variant if variant is not None else resolve(rule)
        strategy.check(key, geometry, rule.r)
        variant.check(key, strategy, geometry, rule.r)
        check_target(rule.init, key, strategy, geometry, rule.r)
        self.key, self.strategy, self.geometry, self.variant = key, strategy, geometry, variant
        self.peft_key = key  # the module name PEFT's files use (a parameter target's: ``peft.parameter_keys``)
        self.r, self.alpha, self.use_rslora, self.init = rule.r, rule.alpha, rule.use_rslora, rule.init
        shape_a, shape_b = variant.shapes(strategy, geometry, rule.r)
        need = (math.prod(shape_a) + math.prod(shape_b)) * torch.empty((), dtype=dtype).element_size()
        if need > device_memory(device):  # an absurd r (a config's typo) is refused before the allocator is asked
            raise RuleError(f"Rule {rule.label}: r={rule.r} on {key!r} needs A {tuple(shape_a)} and B "
                            f"{tuple(shape_b)}: {need / 2**30:.1f} GiB, more than this {device.type} device has "
                            "free; use a smaller r (or rank_pattern for this key).")
        try:
            self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        except RuntimeError as e:  # the allocator's own message names no rule
            raise RuleError(f"Rule {rule.label}: r={rule.r} on {key!r} needs A {tuple(shape_a)} and B "
                            f"{tuple(shape_b)} ({type(e).__name__}: {str(e).splitlines()[0]}); use a smaller r "
                            "(or rank_pattern for this key).") from None
        self.dropout = nn.Dropout(rule.dropout) if rule.dropout > 0 else nn.Identity()
        for name, p in variant.extra_parameters(strategy, geometry, dtype, device).items():
            self.register_parameter(name, p)
        self.reset_parameters()

    @property
    def kind(self) -> str:
        return self.strategy.name

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def dropout_p(self) -> float:
        return float(getattr(self.dropout, "p", 0.0))

    def reset_parameters(self) -> None:
        """PEFT's random init for this kind (an init from W draws only what PEFT draws; ``variants.inits``)."""
        if not self.variant.reset(self, random_part(self.init)):
            self.strategy.reset(self, random_part(self.init))
        if self.init == "orthogonal":
            orthogonal_init(self)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · ΔW`` in ``dtype``, in the base weight's layout and shape."""
        return self.variant.delta(self, dtype)

    def extra_repr(self) -> str:
        variant = "" if self.variant.name == "lora" else f", variant={self.variant!r}"
        return (f"key={self.key!r}, kind={self.kind}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
                f"{variant}")
