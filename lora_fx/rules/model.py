"""Rules that need the model: PEFT's "all-linear" excludes the output layer, and modules in ``modules_to_save``
are saved whole (never given LoRA inside).

Example::

    ruleset, saved = resolve_for_model(as_ruleset("all-linear"), model)
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ..errors import RuleError
from .rule import Rule, RuleSet


def resolve_for_model(ruleset: RuleSet, model: Any) -> tuple[RuleSet, dict[str, Any]]:
    """Apply the options that need the model: exclude the output layer (all-linear) and the modules saved
    whole (PEFT never puts LoRA inside a module in ``modules_to_save``). Returns (rules, saved modules)."""
    if ruleset.exclude_output_layer:
        ruleset = exclude_output_layer(ruleset, model)
    saved = saved_modules(ruleset, model)
    if saved:
        excludes = [Rule(f"re:(.*\\.)?{re.escape(p)}(\\..*)?", exclude=True) for p in saved]
        ruleset = replace(ruleset, rules=[*excludes, *ruleset.rules])
    return ruleset, saved


def exclude_output_layer(ruleset: RuleSet, model: Any) -> RuleSet:
    """Put an exclude rule for ``model``'s output layer (``get_output_embeddings()``) first, as PEFT's
    ``all-linear`` does."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    if head is None:
        return ruleset
    path = next((name for name, m in model.named_modules() if m is head), None)
    if not path:
        return ruleset
    return replace(ruleset, rules=[Rule("re:" + re.escape(path), exclude=True), *ruleset.rules],
                   exclude_output_layer=False)


def saved_modules(ruleset: RuleSet, model: Any) -> dict[str, Any]:
    """Module path -> module for ``ruleset.modules_to_save``, with PEFT's matching (the path ends with a
    name); the outermost of nested matches. RuleError when a name matches nothing."""
    if not ruleset.modules_to_save:
        return {}
    found: dict[str, Any] = {}
    for name in ruleset.modules_to_save:
        hits = [(p, m) for p, m in model.named_modules() if p and p.endswith(name)]
        if not hits and name not in ruleset.optional_saves:
            raise RuleError(f"modules_to_save={name!r} matches no module of {type(model).__name__}; "
                            "name a module path or its last part (e.g. 'classifier', 'score').")
        found.update(hits)
    return {p: m for p, m in found.items() if not any(p.startswith(q + ".") for q in found if q != p)}
