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
    def shapes(self, geometry: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """PEFT's (A, B) shapes for rank ``r``."""
        raise NotImplementedError

    @torch.no_grad()
    def reset(self, unit: LoraUnit, init: bool | str) -> None:
        """PEFT's init for linear and conv: A kaiming-uniform(a=√5) (``"gaussian"``: N(0, 1/r)), B zeros, so
        the layer starts unchanged. ``init=False``: B random too (and lora_B's bias), for tests."""
        a, b = unit.lora_A, unit.lora_B
        if init == "gaussian":
            nn.init.normal_(a, std=1 / unit.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            if unit.lora_B_bias is not None:  # nn.Linear's default bias init, fan_in = r
                nn.init.uniform_(unit.lora_B_bias, -1 / math.sqrt(unit.r), 1 / math.sqrt(unit.r))
        else:
            b.zero_()
            if unit.lora_B_bias is not None:
                unit.lora_B_bias.zero_()

    def check(self, key: str, use_dora: bool, lora_bias: bool, init: bool | str) -> None:
        """Refuse what this kind cannot do (raises RuleError naming the key)."""
        if lora_bias and not self.supports_lora_bias:
            raise RuleError(f"lora_bias on {key!r}: PEFT has no LoRA bias for a {self.name}; drop lora_bias here.")
        if isinstance(init, str) and init not in ("default", "gaussian") and not self.supports_weight_init:
            raise RuleError(f"init={init!r} on {key!r}: PiSSA/OLoRA apply to linear layers only (this is a "
                            f"{self.name}); use init='default' for it.")

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

    def emit_dora(self, g: fx.Graph, geometry: Any, x: fx.Node, y: fx.Node, w: fx.Node, bias: fx.Node | None,
                  params: dict[str, fx.Node], scaling: float, dropout: fx.Node | None, new) -> fx.Node:
        """One node computing PEFT's DoRA output from the base output ``y``."""
        raise NotImplementedError
