"""What data-driven inits (LoRA-GA, CorDA) gather statistics on: the model's linear modules its rules select, found
as PEFT finds them (by module name, ``nn.Linear`` and transformers' ``Conv1D``), before the model is captured.

Example::

    for name, module in linear_targets(model, config, "preprocess_corda"):
        ...
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import RuleError


def linear_targets(model: nn.Module, rules: Any, caller: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of each nn.Linear / Conv1D whose name ``rules`` select (exclusions and layers applied)."""
    from ..rules import as_ruleset

    ruleset = as_ruleset(rules)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            rule = ruleset.decide(name, "linear")
            if rule is not None and not rule.exclude:
                found.append((name, module))
    if not found:
        raise RuleError(f"{caller}: the rules select no nn.Linear or Conv1D module of {type(model).__name__}; name "
                        "linear layers (target_modules) to gather their statistics.")
    return found


def rank_of(rules: Any, name: str) -> int:
    """The rank the rules give module ``name`` (PEFT's rank_pattern applied)."""
    from ..rules import as_ruleset

    ruleset = as_ruleset(rules)
    return ruleset.effective(ruleset.decide(name, "linear"), name).r
