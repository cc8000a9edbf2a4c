"""Rules that need the model: PEFT's "all-linear" excludes the output layer, and modules in ``modules_to_save``
are saved whole (never given LoRA inside).

Example::

    ruleset, saved = resolve_for_model(as_ruleset("all-linear"), model)
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

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


def token_paths(ruleset: RuleSet, model: Any, saved: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Module path -> row indices for PEFT's ``trainable_token_indices`` (a list: the input embedding's rows; a
    dict: by module name, PEFT's suffix matching). Refuses a name matching nothing, a module that is no embedding
    or linear layer, one also in ``modules_to_save``, and tied layers given different rows."""
    given = ruleset.trainable_token_indices
    if not given:
        return {}
    if not isinstance(given, dict):
        path = _input_embeddings(model)
        if path is None:
            raise RuleError(f"trainable_token_indices={list(given)!r}: {type(model).__name__} has no input embedding "
                            "(get_input_embeddings); give a dict {module name: [rows]}.")
        given = {path: given}
    found: dict[str, tuple[int, ...]] = {}
    for name, rows in given.items():
        hits = [p for p, m in model.named_modules() if p and (p == name or p.endswith("." + name))]
        if not hits:
            raise RuleError(f"trainable_token_indices names {name!r}, which matches no module of "
                            f"{type(model).__name__}; name the embedding's path or its last part.")
        for p in hits:
            module = model.get_submodule(p)
            if not isinstance(getattr(module, "weight", None), torch.nn.Parameter) or module.weight.dim() != 2:
                raise RuleError(f"trainable_token_indices on {p!r} ({type(module).__name__}): only an embedding or "
                                "a linear output layer (rows are tokens) has trainable tokens.")
            if any(p == s or p.startswith(s + ".") for s in saved):
                raise RuleError(f"{p!r} is in modules_to_save (trained whole) and in trainable_token_indices; "
                                "name it in one of them (PEFT refuses both too).")
            found[p] = tuple(int(i) for i in rows)
    by_weight: dict[int, tuple[str, tuple[int, ...]]] = {}
    for p, rows in found.items():
        weight = model.get_submodule(p).weight
        other = by_weight.setdefault(id(weight), (p, rows))
        if other[1] != rows:
            raise RuleError(f"trainable_token_indices gives the tied layers {other[0]!r} and {p!r} (one weight) "
                            f"different rows ({list(other[1])} and {list(rows)}); give them the same rows.")
    return {p: rows for p, rows in found.items() if by_weight[id(model.get_submodule(p).weight)][0] == p}


def _input_embeddings(model: Any) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is not None:
        return next((p for p, m in model.named_modules() if m is emb), None)
    return next((p for p, _ in model.named_modules() if p.endswith("embed_tokens")), None)
