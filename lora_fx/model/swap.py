"""Hot swap: replace an existing adapter's weights, ranks, alphas and dropout inside the adapter bank, in place; the
routed graphs read everything from the bank, so nothing is derived again and a compiled model does not recompile.
Planned aside like every verb: a model without a bank gets one in the same commit.

Example::

    lm.load_adapter("adapter_v2", "a", hotswap=True)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bank.bank import plan_bank
from ..errors import AdapterError, CheckpointError
from ..peft.checkpoint import PREFIX
from ..peft.config import ruleset_from_peft_config
from ..variants import resolve
from .state import LoraState
from .verbs import Change, copies, links


def plan_hotswap(state: LoraState, directory: Path, name: str, config: dict, tensors: dict) -> Change:
    """The change that swaps ``tensors`` (a checkpoint of ``directory``) into adapter ``name``'s bank slots."""
    if name not in state.entries:
        raise AdapterError(f"hotswap=True replaces an existing adapter's weights; there is no adapter {name!r} "
                           f"(adapters: {state.names}). Load it once without hotswap.")
    ruleset = ruleset_from_peft_config(config)
    if ruleset.modules_to_save or ruleset.bias != "none" or any(not resolve(r).routable for r in ruleset.rules
                                                                if not r.exclude):
        raise AdapterError(f"{directory}: a hot swap replaces LoRA weights only; this adapter also has "
                           "modules_to_save, a trained bias, or a variant the bank does not route (DoRA, a LoRA "
                           "bias). Load it as a new adapter.")
    units = state.entries[name].by_key
    for key, unit in units.items():
        why = unit.strategy.refusal(unit.geometry, "routing (a hot swap writes the adapter bank)")
        if why:
            raise AdapterError(f"hotswap=True on adapter {name!r}: {key!r} is {why}. Load it as a new adapter.")
    plan = _swap_plan(directory, units, tensors, ruleset)
    rank = max(r for _, r, _, _, _ in plan.values())
    change = Change(state.next(), derive=False)
    bank = state.bank
    if bank is None:
        largest = max(u.r for _, u in state.iter_units())
        default = state.active[0] if len(state.active) == 1 else None
        bank, pairs = plan_bank(state.entries, max(rank, largest), default)
        change = Change(state.next(bank=bank), [links(pairs)])
    if rank > bank.max_rank:
        raise AdapterError(f"{directory}: rank {rank} exceeds the adapter bank's maximum rank {bank.max_rank}; "
                           f"build_adapter_bank(max_rank={rank}) first (one graph rebuild).")
    slot = bank.slots.index(name)
    overrides = {}
    for key, unit in units.items():
        a_slot = bank.tensor(key, "A")[slot]
        b_slot = bank.tensor(key, "B")[slot]
        a_new, b_new = torch.zeros_like(a_slot), torch.zeros_like(b_slot)
        if key in plan:
            a, r, alpha, rslora, dropout = plan[key]
            a_new[:r] = a
            b_new[:, :r] = tensors[f"{PREFIX}{key}.{unit.strategy.peft_b}"]
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            overrides[unit] = (scaling, dropout)
            change.effects.append(_set_unit(unit, r, alpha, rslora, dropout))
        change.effects.append(_write(a_slot, a_new))
        change.effects.append(_write(b_slot, b_new))
    settings = bank.settings(state.entries, overrides)
    change.effects.append(copies(settings))
    for drop in bank.dropouts.values():
        change.effects.append(_any(drop, settings))
    return change


def _write(tensor: torch.Tensor, value: torch.Tensor) -> Any:
    return lambda tx: tx.copy_(tensor, value)


def _set_unit(unit: nn.Module, r: int, alpha: float, rslora: bool, dropout: float) -> Any:
    def effect(tx: Any) -> None:
        tx.setattr(unit, "r", r)
        tx.setattr(unit, "alpha", alpha)
        tx.setattr(unit, "use_rslora", rslora)
        tx.setattr(unit, "dropout", nn.Dropout(dropout) if dropout > 0 else nn.Identity())
    return effect


def _any(drop: nn.Module, settings: list) -> Any:
    value = next((v for b, v in settings if b is drop.p), drop.p)
    return lambda tx: tx.setattr(drop, "any", bool((value > 0).any()))


def _swap_plan(directory: Path, units: Any, tensors: dict[str, torch.Tensor], ruleset: Any) -> dict[str, tuple]:
    """key -> (A, rank, alpha, use_rslora, dropout) for each of the adapter's keys the checkpoint holds; every
    tensor must belong to one of them, with the unit's feature sizes."""
    names = {}
    for key, unit in units.items():
        names[f"{PREFIX}{key}.{unit.strategy.peft_a}"] = (key, "A")
        names[f"{PREFIX}{key}.{unit.strategy.peft_b}"] = (key, "B")
    outside = sorted(n for n in tensors if n not in names)
    if outside:
        raise AdapterError(f"{directory}: tensors {outside[:4]} target modules outside this adapter's slots in the "
                           "bank; a hot swap takes the same targets or a subset. Load it as a new adapter.")
    plan = {}
    for key, unit in units.items():
        a_name, b_name = f"{PREFIX}{key}.{unit.strategy.peft_a}", f"{PREFIX}{key}.{unit.strategy.peft_b}"
        if a_name not in tensors and b_name not in tensors:
            continue
        if a_name not in tensors or b_name not in tensors:
            raise CheckpointError(f"{directory}: {key!r} has only one of lora_A / lora_B.")
        a, b = tensors[a_name], tensors[b_name]
        r = a.shape[0]
        full_a, full_b = unit.strategy.shapes(unit.geometry, r)
        if tuple(a.shape) != tuple(full_a) or tuple(b.shape) != tuple(full_b):
            raise CheckpointError(f"{directory}: {key!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; this model "
                                  f"needs A {tuple(full_a)} and B {tuple(full_b)} for rank {r}.")
        rule = ruleset.decide(key, unit.kind)
        if rule is None or rule.exclude:
            raise CheckpointError(f"{directory}: its config does not target {key!r}, yet it holds tensors for it.")
        rule = ruleset.effective(rule, key)
        if rule.r != r:
            raise CheckpointError(f"{directory}: {key!r} has rank {r} but its config says r={rule.r}.")
        if not math.isfinite(float(rule.alpha)):
            raise CheckpointError(f"{directory}: lora_alpha for {key!r} is not finite.")
        plan[key] = (a, r, rule.alpha, rule.use_rslora, rule.dropout)
    if not plan:
        raise CheckpointError(f"{directory}: no tensor of this adapter's targets; nothing to swap in.")
    return plan
