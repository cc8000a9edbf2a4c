"""A unit's variant: what its adapter is beyond its kind. ``Variant`` itself is plain LoRA; DoRA, a LoRA bias and
output slices subclass it (``dora``, ``biased``, ``sliced``), and a new PEFT variant is one more subclass plus a
line in the registry (``variants/__init__``).

A variant owns, for its units: the parameters (``shapes``, ``extra_parameters``), what it does at init beyond the
kind's random draws (``init``), the graph branch it emits (``emit``), ``s·ΔW`` and how it folds into W
(``delta``, ``merge_factor``, ``bias_delta``), and PEFT's names and shapes for its tensors (``peft_tensors``,
``peft_rank``, ``peft_alpha``). It declares what it supports (``routable``, ``fusable``, ``combinable``,
``stacks``); callers ask these and ``refusal(operation)`` names the variant in their errors. For plain LoRA on a
linear target the branch is::

    y' = y + s · B A dropout(x)              ΔW = s · B A

Example::

    unit.variant.delta(unit, torch.float32)           # s·ΔW in the base weight's layout
    unit.variant.routable                             # may it sit in an adapter bank?
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..errors import RuleError

if TYPE_CHECKING:
    from ..adapters.unit import LoraUnit


class Variant:
    name = "lora"
    label = "plain LoRA"  # how errors name it
    field = ""  # the Rule / LoraConfig field that selects it (set by the registry)
    routable = True  # its units can be slots of an adapter bank (per-row routing, hot swap)
    fusable = True  # sibling fusion may compute its branch (linear targets)
    combinable = True  # add_weighted_adapter may combine it
    stacks = True  # it merges into W together with other adapters on the same key
    casts_output = True  # its branch output is cast back to the base dtype by the insert pass
    frozen: tuple[str, ...] = ()  # unit tensors that never train (MiCA's B)
    exclusive = False  # its adapters cannot share a model with adapters of other variants (KaSA, as PEFT)
    decodes = True  # lm.generate may run it in its static-cache graphs (aLoRA: the model's own generate)
    loss_reduction = "sum"  # how ``lm.variant_loss()`` combines its units' ``regularization`` terms ("sum", "mean")
    load_hint = ""  # added to the error when a file's tensors do not have this variant's shapes

    def params(self) -> tuple:
        """The settings that make this variant object what it is (a parametrised variant's constructor arguments):
        its equality, hash, repr and signature follow them."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.params()!r}" if self.params() else f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.params()))

    def refusal(self, operation: str) -> str:
        return f"{self.label} does not support {operation}"

    def signature(self) -> tuple:
        """What this variant's branch nodes depend on besides the unit's own scalars (shared block programs)."""
        return (self.name, *self.params())

    # ---- parameters -----------------------------------------------------------------------------------
    def check(self, key: str, kind: Any, geometry: Any, r: int) -> None:
        """Refuse a target this variant cannot adapt (RuleError naming the key)."""

    def refuse_rows(self, key: str, geometry: Any) -> None:
        """For variants that read the whole weight: refuse a target whose ops each read rows of it."""
        if getattr(geometry, "rows", None) is not None:
            raise RuleError(f"{self.label} on {key!r}: its ops each read a slice of the weight's rows (a "
                            f"MultiheadAttention's q, k and v), which {self.label} does not describe; use plain LoRA "
                            "for this key.")

    def shapes(self, kind: Any, geometry: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B as the unit holds them."""
        return kind.shapes(geometry, r)

    def extra_parameters(self, kind: Any, geometry: Any, dtype: torch.dtype,
                         device: torch.device) -> dict[str, nn.Parameter]:
        """Parameters besides A and B, by attribute name (PEFT's init values)."""
        return {}

    def reset(self, unit: LoraUnit, init: bool | str) -> bool:
        """Draw A and B itself, in PEFT's order for this variant (True), or leave it to the kind (False)."""
        return False

    def init(self, unit: LoraUnit, weight: torch.Tensor) -> None:
        """What the variant sets from the base weight once A and B are initialised."""

    def residual(self, unit: LoraUnit, weight: torch.Tensor, source: nn.Module | None = None) -> torch.Tensor | None:
        """What the base weight becomes when the adapter is added (None: it stays; KaSA truncates it). ``source``: the
        model's module that owns the weight (data-driven inits read what was gathered on it), if there is one."""
        return None

    def regularization(self, unit: LoraUnit) -> torch.Tensor | None:
        """An auxiliary loss term the variant's method trains with (None: none; ``lm.variant_loss()`` sums them)."""
        return None

    # ---- weights ---------------------------------------------------------------------------------------
    def whole_b(self, unit: LoraUnit, b: torch.Tensor | None = None) -> torch.Tensor:
        """B in PEFT's whole-layer layout (``b``: another tensor in the unit's B layout, e.g. a saved one)."""
        return unit.lora_B if b is None else b

    def delta(self, unit: LoraUnit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · ΔW`` in ``dtype``, in the base weight's layout and shape (detached)."""
        a, b = unit.lora_A.detach().to(dtype), self.whole_b(unit).detach().to(dtype)
        return unit.strategy.delta(a, b, unit.scaling, unit.geometry)  # a padded bank slot's extra rank is zero

    def merge_factor(self, unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor | None:
        """A per-output factor the merged weight ``W + s·ΔW`` is multiplied by (None: none)."""
        return None

    def bias_delta(self, unit: LoraUnit, dtype: torch.dtype) -> torch.Tensor | None:
        """What merging adds to the base bias (None: nothing)."""
        return None

    # ---- PEFT's format ----------------------------------------------------------------------------------
    def peft_rank(self, unit: LoraUnit) -> int:
        return unit.r

    def peft_alpha(self, unit: LoraUnit) -> float:
        return unit.alpha

    def peft_shapes(self, kind: Any, geometry: Any, r: int) -> dict[str, tuple[int, ...]]:
        """PEFT's tensor-name suffix -> the shape PEFT's file holds for A and B of rank ``r`` (checked against a
        file's header before anything is allocated)."""
        shape_a, shape_b = self.shapes(kind, geometry, r)
        return {kind.peft_a: tuple(shape_a), kind.peft_b: tuple(shape_b)}

    def peft_tensors(self, unit: LoraUnit) -> dict[str, torch.Tensor]:
        """PEFT's tensor-name suffix -> the unit's tensor (views of the true rank of a padded bank slot: copying
        into them writes the unit)."""
        kind, a, b = unit.strategy, unit.lora_A, unit.lora_B
        if tuple(a.shape) != tuple(self.shapes(kind, unit.geometry, unit.r)[0]):  # a padded bank slot
            a, b = a[:unit.r], b[:, :unit.r]
        return {kind.peft_a: a, kind.peft_b: b}

    def saved_tensors(self, unit: LoraUnit, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``peft_tensors``-named values as PEFT's file holds them (whole-layer layouts)."""
        return tensors

    def loaded_tensors(self, unit: LoraUnit, tensors: dict[str, torch.Tensor], source: Any) -> dict[str, torch.Tensor]:
        """The inverse of ``saved_tensors`` for values read from a file (refusing what does not fit)."""
        return tensors

    def peft_config_fields(self) -> dict[str, Any]:
        """PEFT config fields that make PEFT build this variant (beyond the boolean ones in ``PEFT_FIELDS``)."""
        return {}

    def peft_metadata(self, unit: LoraUnit) -> dict[str, Any] | None:
        """What lora_fx records beside PEFT's tensors to read the unit back as this variant (None: nothing)."""
        return None

    def report_rows(self, unit: LoraUnit, row: dict) -> list[dict]:
        return [row]

    # ---- graph ------------------------------------------------------------------------------------------
    def emit(self, bb: Any) -> fx.Node:
        """The branch nodes after the base node (``bb``: the insert pass's BranchBuilder); returns the new output."""
        x = bb.activation()
        a, b = bb.tensor("lora_A"), self.b_node(bb)
        delta = bb.kind.emit_at(bb.graph, bb.geometry, bb.node, x, a, b, self.b_bias(bb), bb.new)
        scaled = bb.new("call_function", operator.mul, (delta, bb.unit.scaling), "lora_scaled")
        return bb.new("call_function", operator.add, (bb.y, scaled), "lora")

    # ---- eager (transformers' own generate) ----------------------------------------------------------------
    def eager(self, unit: LoraUnit, x: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        """The branch ``s · B A x`` in eval, computed as PEFT's layer computes it (no graph; ``generation.eager``
        adds it to the layer's output). Linear targets that read the input ``x``; ``context``: the call's
        ``input_ids`` (aLoRA reads them); ``eager_refusal`` says beforehand what it cannot run."""
        return self.eager_b(unit, self.eager_a(unit, x)) * unit.scaling

    def eager_refusal(self, unit: LoraUnit) -> str | None:
        """Why ``eager`` cannot run ``unit`` (None: it can)."""
        if unit.strategy.name != "linear" or getattr(unit.geometry, "left", False):
            return (f"{unit.key!r} is a {unit.kind} target; transformers' generate path runs LoRA on linear layers "
                    "only. Use lm.generate's own arguments (greedy, sampling), or merge first.")
        return None

    def eager_a(self, unit: LoraUnit, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, unit.lora_A)

    def eager_b(self, unit: LoraUnit, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.whole_b(unit))

    def emit_through_input(self, bb: Any, suffix: str) -> fx.Node:
        """``y + s · B h`` where the unit's input module (it replaces the dropout: VeLoRA, MonteCLoRA) computes
        ``h`` from ``(x, A)``, following ``train()`` / ``eval()``."""
        h = bb.new("call_module", bb.dropout_path(), (bb.cast(), bb.tensor("lora_A")), suffix)
        d = bb.new("call_function", torch.nn.functional.linear, (h, bb.tensor("lora_B")), "lora_b")
        scaled = bb.new("call_function", operator.mul, (d, bb.unit.scaling), "lora_scaled")
        return bb.new("call_function", operator.add, (bb.y, scaled), "lora")

    def b_node(self, bb: Any) -> fx.Node:
        return bb.tensor("lora_B")

    def b_bias(self, bb: Any) -> fx.Node | None:
        return None


PLAIN = Variant()


@torch.no_grad()
def dense_draws(unit: LoraUnit, init: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of a linear unit as PEFT draws them before a variant replaces one (``nn.Linear``'s own kaiming
    draws, then ``reset_lora_parameters``), for variants whose PEFT layer swaps a factor after that."""
    dense = type(unit.strategy).shapes(unit.strategy, unit.geometry, unit.r)
    a, b = torch.empty(dense[0]), torch.empty(dense[1])
    torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)
    torch.nn.init.kaiming_uniform_(b, a=5 ** 0.5)
    if init is not False:
        if init == "gaussian":
            torch.nn.init.normal_(a, std=1 / unit.r)
        else:
            torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)
        b.zero_()
    return a, b
