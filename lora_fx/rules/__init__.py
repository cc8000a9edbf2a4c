"""Rules: which targets get LoRA and with which hyper-parameters (``rule``), matched against a model's targets
(``matching``), with the options that need the model (``model``) and the forms ``lorafy`` accepts (``coerce``)."""

from .coerce import RuleLike, as_ruleset
from .rule import Rule, RuleSet, layer_index, match_pattern

__all__ = ["Rule", "RuleSet", "RuleLike", "as_ruleset", "layer_index", "match_pattern"]
