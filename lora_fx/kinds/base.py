"""The strategy interface of a target kind, and the typed geometry recognisers attach to targets.

A ``Kind`` owns everything that differs between linear, embedding and convolution targets: PEFT's parameter
shapes and init, ``ΔW`` in the base weight's layout, the graph nodes of the LoRA branch and of DoRA, and the
tensor names PEFT saves. Everything else (rules, store, passes, checkpoints) is written once, for any kind.

Example::

    kind = KINDS["linear"]
    shape_a, shape_b = kind.shapes(LinearGeometry(in_features=64, out_features=32), r=8)   # (8, 64), (32, 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..errors import RuleError

if TYPE_CHECKING:
    from ..store import LoraUnit


WEIGHT_INITS = ("pissa", "olora")  # inits that take A and B from the base weight


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU tensor shaped like ``t``, where PEFT draws its random adapter values."""
    return torch.empty(t.shape, dtype=torch.float32)


@dataclass(frozen=True)
class BiasRef:
    """Where a base layer's bias lives: a parameter path in the graph's module (``attr``), or an argument
    of the base node (``at`` = (position, keyword))."""

    attr: str | None = None
    at: tuple[int, str] | None = None


class Kind:
    """Strategy for one target kind. Subclasses set ``name`` and the PEFT tensor names, and implement
    ``shapes``, ``delta`` and ``emit``."""

    name = ""
    peft_a = "lora_A.weight"
    peft_b = "lora_B.weight"
    reads_activation = True  # the branch input is an activation (cast, dropout); an embedding's is indices
    supports_lora_bias = True
    supports_weight_init = False  # PiSSA / OLoRA (A and B from the SVD / QR of W)

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"

    # ---- parameters ----------------------------------------------------------------------------------
    def shapes(self, geometry: Any, r: int, slices: Any = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """PEFT's (A, B) shapes for rank ``r`` (linear with ``slices``: A ``[k·r, in]``, B packed ``[Σ len, r]``)."""
        raise NotImplementedError

    @torch.no_grad()
    def reset(self, unit: LoraUnit, init: bool | str) -> None:
        """PEFT's init for linear and conv, with PEFT's random draws in PEFT's order (CPU, float32, then copied to
        the unit's device and dtype), so one seed gives PEFT's adapter: the A and B layers as torch builds them
        (kaiming-uniform(a=√5), B's bias uniform(±1/√fan_in)), which is ``init=False``'s result; then A drawn
        again (kaiming-uniform, or N(0, 1/r) for ``"gaussian"``) and B (and its bias) zeroed, so the layer
        starts unchanged. PiSSA/OLoRA set A and B from W afterwards (``init_schemes``)."""
        a = _cpu(unit.lora_A)
        b = _cpu(unit.lora_B)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        bias = _cpu(unit.lora_B_bias) if unit.lora_B_bias is not None else None
        if bias is not None:
            bound = 1 / math.sqrt(b[0].numel())
            nn.init.uniform_(bias, -bound, bound)
        if init is not False and init not in WEIGHT_INITS and not str(init).startswith("pissa_niter_"):
            if init == "gaussian":
                nn.init.normal_(a, std=1 / unit.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()
            if bias is not None:
                bias.zero_()
        unit.lora_A.copy_(a)
        unit.lora_B.copy_(b)
        if bias is not None:
            unit.lora_B_bias.copy_(bias)

    def check(self, key: str, use_dora: bool, lora_bias: bool, init: bool | str) -> None:
        """Refuse what this kind cannot do (raises RuleError naming the key)."""
        if lora_bias and not self.supports_lora_bias:
            raise RuleError(f"lora_bias on {key!r}: PEFT has no LoRA bias for a {self.name}; drop lora_bias here.")
        if isinstance(init, str) and init not in ("default", "gaussian") and not self.supports_weight_init:
            raise RuleError(f"init={init!r} on {key!r}: PiSSA/OLoRA apply to linear layers only (this is a "
                            f"{self.name}); use init='default' for it.")

    def check_geometry(self, key: str, geometry: Any, rule: Any) -> None:
        """Refuse a rule's options that this target's geometry cannot take (raises RuleError naming the key)."""
        if getattr(rule, "out_slices", None):
            raise RuleError(f"out_slices on {key!r}: output slices apply to linear targets only (this is a "
                            f"{self.name}); drop out_slices from the rule for it.")

    # ---- weights ---------------------------------------------------------------------------------------
    def delta(self, unit: LoraUnit, dtype: torch.dtype) -> torch.Tensor:
        """``s · ΔW`` in the base weight's layout and shape, computed in ``dtype``."""
        raise NotImplementedError

    def oriented(self, weight: torch.Tensor, geometry: Any) -> torch.Tensor:
        """W with the output dimension first (what DoRA normalises per row)."""
        return weight

    def dora_norm(self, unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor:
        """``‖W + s·ΔW‖`` per output, detached, in PEFT's shape for ``lora_magnitude_vector``."""
        w = self.oriented(weight, unit.geometry) + self.oriented(self.delta(unit, weight.dtype), unit.geometry)
        return torch.linalg.norm(w, dim=1).detach()

    def dora_factor(self, unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor:
        """``m / ‖W + s·ΔW‖`` shaped to scale W (in its own layout) output by output."""
        factor = unit.lora_magnitude_vector.detach().to(weight.dtype) / self.dora_norm(unit, weight)
        return factor.view(-1, 1)

    # ---- graph -------------------------------------------------------------------------------------------
    def emit(self, g: fx.Graph, geometry: Any, x: fx.Node, a: fx.Node, b: fx.Node, b_bias: fx.Node | None,
             name: str, new) -> fx.Node:
        """Nodes computing the unscaled branch ``B A x`` (+ lora_B's bias); ``new(op, target, args, suffix,
        kwargs=None)`` creates a tagged node."""
        raise NotImplementedError

    def emit_routed(self, g: fx.Graph, geometry: Any, x: fx.Node, y: fx.Node, bank: tuple, new) -> fx.Node:
        """One node computing ``y`` plus each row's own adapter's delta (``routing``); ``bank`` is the node tuple
        ``(route, scales, A bank, B bank, A units, B units)``."""
        raise NotImplementedError

    def emit_dora(self, g: fx.Graph, geometry: Any, x: fx.Node, y: fx.Node, w: fx.Node, bias: fx.Node | None,
                  params: dict[str, fx.Node], scaling: float, dropout: fx.Node | None, new) -> fx.Node:
        """One node computing PEFT's DoRA output from the base output ``y``."""
        raise NotImplementedError
