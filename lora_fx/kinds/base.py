"""The strategy interface of a target kind, and the typed geometry recognisers attach to targets.

A ``Kind`` owns what differs between linear, embedding and convolution targets: PEFT's parameter shapes and
random init, ``ΔW`` in the base weight's layout, the graph nodes of the LoRA branch (plain, routed and DoRA),
and the tensor names PEFT saves. What an adapter is beyond its kind (DoRA, a LoRA bias, output slices) is its
variant (``variants``); everything else (rules, store, passes, checkpoints) is written once, for any kind.

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

if TYPE_CHECKING:
    from ..adapters.unit import LoraUnit


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
    ``shapes``, ``delta``, ``emit`` and ``emit_routed``."""

    name = ""
    peft_a = "lora_A.weight"
    peft_b = "lora_B.weight"
    reads_activation = True  # the branch input is an activation (cast, dropout); an embedding's is indices
    supports_bias = True  # PEFT has a LoRA bias (on B) for this kind
    supports_weight_init = False  # inits that take A and B from W (PiSSA / OLoRA)
    supports_dora = True
    explicit = False  # only rules that name this kind in ``kinds=`` match it (parameter targets)

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"

    # ---- parameters ----------------------------------------------------------------------------------
    def shapes(self, geometry: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """PEFT's (A, B) shapes for rank ``r``."""
        raise NotImplementedError

    @torch.no_grad()
    def reset(self, unit: LoraUnit, init: bool | str) -> None:
        """PEFT's init for linear and conv, with PEFT's random draws in PEFT's order (CPU, float32, then copied to
        the unit's device and dtype), so one seed gives PEFT's adapter: the A and B layers as torch builds them
        (kaiming-uniform(a=√5), B's bias uniform(±1/√fan_in)), which is ``init=False``'s result; then, unless
        ``init`` is False, A drawn again (kaiming-uniform, or N(0, 1/r) for ``"gaussian"``) and B (and its bias)
        zeroed, so the layer starts unchanged. Inits from W overwrite A and B afterwards (``variants.inits``)."""
        a, b = _cpu(unit.lora_A), _cpu(unit.lora_B)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        b_bias = getattr(unit, "lora_B_bias", None)
        bias = _cpu(b_bias) if b_bias is not None else None
        if bias is not None:
            bound = 1 / math.sqrt(b[0].numel())
            nn.init.uniform_(bias, -bound, bound)
        if init is not False:
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
            b_bias.copy_(bias)

    def check(self, key: str, geometry: Any, r: int) -> None:
        """Refuse a rank this target cannot take (RuleError naming the key)."""

    def refusal(self, geometry: Any, operation: str) -> str | None:
        """Why ``operation`` ("merging", "routing", "combining") is impossible for this target, else None."""
        return None

    # ---- weights ---------------------------------------------------------------------------------------
    def delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float, geometry: Any) -> torch.Tensor:
        """``s · ΔW`` in the base weight's layout and shape from A and PEFT's whole-layer B (in their dtype)."""
        raise NotImplementedError

    def oriented(self, weight: torch.Tensor, geometry: Any) -> torch.Tensor:
        """W with the output dimension first (what DoRA normalises per row and SVD-based combinations read)."""
        return weight

    def norm(self, weight: torch.Tensor, geometry: Any) -> torch.Tensor:
        """``‖W‖`` per output in PEFT's shape for DoRA's ``lora_magnitude_vector``."""
        return torch.linalg.norm(self.oriented(weight, geometry), dim=1)

    def per_output(self, factor: torch.Tensor, geometry: Any) -> torch.Tensor:
        """A per-output factor (in ``norm``'s shape) shaped to scale W in its own layout."""
        return factor.view(-1, 1)

    # ---- graph -------------------------------------------------------------------------------------------
    def emit(self, g: fx.Graph, geometry: Any, x: fx.Node, a: fx.Node, b: fx.Node, b_bias: fx.Node | None,
             new) -> fx.Node:
        """Nodes computing the unscaled branch ``B A x`` (+ lora_B's bias); ``new(op, target, args, suffix,
        kwargs=None)`` creates a tagged node."""
        raise NotImplementedError

    def emit_at(self, g: fx.Graph, geometry: Any, node: fx.Node, x: fx.Node, a: fx.Node, b: fx.Node,
                b_bias: fx.Node | None, new) -> fx.Node:
        """``emit`` for the branch of base node ``node`` (a kind whose branch reads more of the base op than its
        input overrides this)."""
        return self.emit(g, geometry, x, a, b, b_bias, new)

    def emit_routed(self, g: fx.Graph, geometry: Any, x: fx.Node, y: fx.Node, bank: tuple, new) -> fx.Node:
        """One node computing ``y`` plus each row's own adapter's delta (``bank.routing``); ``bank`` is the node
        tuple ``(route, scales, A bank, B bank, A units, B units)``."""
        raise NotImplementedError

    def emit_dora(self, g: fx.Graph, geometry: Any, x: fx.Node, y: fx.Node, w: fx.Node, bias: fx.Node | None,
                  params: dict[str, fx.Node], scaling: float, dropout: fx.Node | None, new) -> fx.Node:
        """One node computing PEFT's DoRA output from the base output ``y``."""
        raise NotImplementedError
