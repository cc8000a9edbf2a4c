"""``add_weighted_adapter``: a new adapter that combines existing ones with PEFT's combination types, planned aside
(the combination math is ``adapters.weighted``).

Example::

    errors = lm.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="svd", svd_rank=8)
"""

from __future__ import annotations

import re

import torch

from ..adapters.weighted import check_args, combine
from ..errors import AdapterError
from ..rules import Rule, RuleSet
from .state import LoraState
from .verbs import Change, new_entry, with_entry


def plan_weighted(state: LoraState, adapters: list[str], weights: list[float], adapter_name: str,
                  combination_type: str, svd_rank: int | None, density: float | None,
                  majority_sign_method: str) -> Change:
    check_args(adapters, weights, combination_type, density, majority_sign_method, svd_rank)
    entries = [state.entry(a) for a in adapters]  # raises for an unknown name
    keys: dict[str, list] = {}
    for name, w, entry in zip(adapters, weights, entries):
        if entry.saved_copies() or entry.token_deltas():
            raise AdapterError(f"Adapter {name!r} has modules_to_save copies or trainable tokens, which cannot be "
                               "combined.")
        for key, unit in entry.by_key.items():
            why = unit.strategy.refusal(unit.geometry, "a weighted combination")
            if why:
                raise AdapterError(f"Adapter {name!r} targets {key!r}, {why}.")
            if not unit.variant.combinable:
                raise AdapterError(f"Adapter {name!r} uses {unit.variant.label} on {key!r}; a weighted combination "
                                   "takes plain whole-layer LoRA adapters.")
            keys.setdefault(key, []).append((float(w), unit))
    results = {key: combine(parts, combination_type, svd_rank, density, majority_sign_method)
               for key, parts in keys.items()}
    dropout = next(iter(entries[0].by_key.values())).dropout_p
    by_rank: dict[int, list[str]] = {}
    for key, (a, _, _) in results.items():
        by_rank.setdefault(a.shape[0], []).append(re.escape(key))
    ruleset = RuleSet([Rule("re:" + "|".join(ks), r=r, alpha=r, dropout=dropout) for r, ks in by_rank.items()])
    entry, residuals = new_entry(state, adapter_name, ruleset, autocast=True)
    with torch.no_grad():  # the new adapter is not live yet
        for key, (a, b, _) in results.items():
            entry.by_key[key].lora_A.copy_(a)
            entry.by_key[key].lora_B.copy_(b)
    entry.svd_error = {k: e for k, (_, _, e) in results.items() if e is not None}
    change = with_entry(state, adapter_name, entry, residuals)
    change.result = dict(entry.svd_error)
    return change
