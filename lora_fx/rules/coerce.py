"""Normalise what ``lorafy`` accepts as rules (a Rule, a string, a sequence of them, ``"all-linear"``, or a
``peft.LoraConfig``) into a RuleSet.

Example::

    as_ruleset(["q_proj", Rule("v_proj", r=4)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import RuleError
from ..peft.config import is_peft_config, ruleset_from_peft_config
from .rule import Rule, RuleSet

RuleLike = Rule | str | Sequence[Rule | str] | Any


def as_ruleset(rules: RuleLike) -> RuleSet:
    """Normalise a Rule, a string, a sequence of them, or a ``peft.LoraConfig`` into a RuleSet."""
    if isinstance(rules, RuleSet):
        return rules
    if is_peft_config(rules):
        return ruleset_from_peft_config(rules)
    if rules == "all-linear":
        return RuleSet([Rule("*", kinds={"linear"})], exclude_output_layer=True)
    if isinstance(rules, (Rule, str)):
        rules = [rules]
    if not isinstance(rules, Sequence) or not rules:
        raise RuleError(
            f"rules must be a Rule, a string, a non-empty sequence of them, or a peft.LoraConfig; got {rules!r}."
        )
    out = []
    for item in rules:
        if isinstance(item, str):
            out.append(Rule(item))
        elif isinstance(item, Rule):
            out.append(item)
        else:
            raise RuleError(f"rules: expected a Rule or a string, got {item!r} ({type(item).__name__}).")
    return RuleSet(out)
