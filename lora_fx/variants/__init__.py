"""Variants: what a unit's adapter is beyond its kind, one object each (``base.Variant`` is plain LoRA), and the one
place that maps a rule's flags to a variant and a variant back to PEFT's config fields.

Adding a PEFT variant: a ``Variant`` subclass in its own module (parameters, init, branch, ΔW, merge, PEFT's
tensor names, what it supports), a line in ``resolve`` for the rule field that asks for it, and its PEFT config
field in ``PEFT_FIELDS``. Nothing else in lora_fx tests variant flags.

Example::

    variant = resolve(Rule("q_proj", use_dora=True))     # DORA
    variant.routable, variant.fusable                   # False, False
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .alora import Alora
from .arrow import Arrow
from .base import PLAIN, Variant
from .bdlora import BdLora
from .biased import BIASED, Biased
from .corda import Corda
from .dora import DORA, DoRA
from .kasa import Kasa
from .loftq import Loftq
from .loraga import LoraGA
from .mica import MICA, MiCA
from .monteclora import Monteclora
from .qalora import Qalora
from .sliced import Sliced
from .velora import Velora

# PEFT's LoraConfig field that selects each variant (a variant not listed has none: plain LoRA, slices)
PEFT_FIELDS = {DoRA: "use_dora", Biased: "lora_bias"}
Sliced.field = "out_slices"  # a lora_fx Rule field (saved as PEFT's whole-layer LoRA)
for _cls, _field in PEFT_FIELDS.items():
    _cls.field = _field


def resolve(rule: Any) -> Variant:
    """The variant a (validated) rule asks for."""
    if rule.arrow is not None:
        return Arrow(rule.arrow)
    if rule.alora is not None:
        return Alora(rule.alora)
    if rule.init == "mica":
        return MICA
    if rule.init == "loftq":
        return Loftq(*rule.loftq)
    if rule.init == "lora_ga":
        return LoraGA(*rule.lora_ga)
    if rule.init == "corda":
        return Corda(rule.corda)
    if rule.kasa:
        return Kasa(*rule.kasa)
    if rule.velora:
        return Velora(*rule.velora)
    if rule.monteclora:
        return Monteclora(*rule.monteclora)
    if rule.qalora:
        return Qalora(rule.qalora)
    if rule.block_diagonal:
        return BdLora(*rule.block_diagonal)
    if rule.use_dora:
        return DORA
    if rule.lora_bias:
        return BIASED
    if rule.out_slices:
        return Sliced(rule.out_slices)
    return PLAIN


def rule_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The Rule keyword arguments for the variant fields of a PEFT config dict."""
    return {field: bool(config.get(field, False)) for field in PEFT_FIELDS.values()}


def peft_fields(variants: Iterable[Variant]) -> dict[str, bool]:
    """PEFT's config fields for an adapter whose units have ``variants`` (PEFT has one value per adapter: a field
    that differs between units is refused by the caller through ``mixed``)."""
    variants = list(variants)
    return {field: any(type(v) is cls for v in variants) for cls, field in PEFT_FIELDS.items()}


def mixed(variants: Iterable[Variant]) -> list[str]:
    """PEFT fields that would have to be True for some units and False for others."""
    variants = list(variants)
    return [field for cls, field in PEFT_FIELDS.items()
            if len({type(v) is cls for v in variants}) > 1]


__all__ = ["Variant", "PLAIN", "DORA", "BIASED", "MICA", "MiCA", "BdLora", "Kasa", "Velora", "Loftq", "LoraGA",
           "Corda", "Monteclora", "Qalora", "Arrow", "Alora", "Sliced", "resolve", "peft_fields", "rule_fields",
           "mixed", "PEFT_FIELDS"]
