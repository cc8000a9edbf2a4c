"""Many adapters at once: the adapter bank verbs of LoraModel, per-row routing and hot swap.

``build_adapter_bank`` stacks every adapter of the store (one slot each, plus ``"__base__"``) padded to one
maximum rank and rebuilds the graphs routed (``passes.routed``): ``lm(x, adapter_names=[...])`` and
``lm.generate(..., adapter_names=[...])`` then give each row its own adapter in one graph, and neither
``set_adapter`` nor ``load_adapter(..., hotswap=True)`` changes a graph. The bank is built on first use of
``adapter_names`` or ``hotswap``; build it yourself to choose the maximum rank, and before creating an optimiser
(the units' parameters keep their identity but take the padded shape).

Example::

    lm.build_adapter_bank(max_rank=32)
    out = lm(ids, adapter_names=["a", "b", "__base__", "a"])
    lm.load_adapter("new_a", "a", hotswap=True)          # no recompile
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .bank import BANK, BASE, AdapterBank, build_bank, unbank
from .checkpoint import PREFIX
from .errors import AdapterError, CheckpointError, MergeError
from .peft_config import ruleset_from_peft_config


class BankMixin:
    """Adapter-bank verbs for LoraModel (which provides the store, refresh and the merge state)."""

    @property
    def adapter_bank(self) -> AdapterBank | None:
        """The adapter bank when adapters are routed per row (``build_adapter_bank``), else None."""
        return self.adapters.bank

    def build_adapter_bank(self, max_rank: int | None = None) -> None:
        """Stack every adapter in the store (one slot each, in store order, plus ``"__base__"``) padded to
        ``max_rank`` (default: the largest rank in the store) and route the graphs through it. Hot swaps then
        take any rank up to ``max_rank``; adding or deleting an adapter rebuilds the bank (one graph rebuild).
        Refuses adapters the bank cannot route (DoRA, lora_bias, modules_to_save, trained biases)."""
        if self._merge is not None:
            raise MergeError(f"Adapters {self._merge.adapters} are merged into the weights every row shares; "
                             "unmerge() before building an adapter bank.")
        if self._sharded:
            raise AdapterError("An adapter bank cannot be built on a model sharded with FSDP2 (its slots are views "
                               "of one stacked tensor per target); build it before fully_shard or serve unsharded.")
        self._install_bank(max_rank)

    def _install_bank(self, max_rank: int | None) -> None:
        store = self.adapters
        old = store.bank
        bank = build_bank(store, max_rank)  # checks first; then every unit is a view of its slot
        store._modules[BANK] = bank
        try:
            self.refresh()
        except BaseException:
            unbank(store)
            if old is not None:
                store._modules[BANK] = build_bank(store, old.max_rank)
            else:
                del store._modules[BANK]
            self.refresh()
            raise
        self._freeze()

    def remove_adapter_bank(self) -> None:
        """Give each adapter its own tensors at its true rank again and rebuild the graphs unrouted."""
        store = self.adapters
        if store.bank is None:
            raise AdapterError("There is no adapter bank to remove.")
        unbank(store)
        del store._modules[BANK]
        self.refresh()
        self._freeze()

    def _bank_current(self) -> bool:
        """Whether the bank holds exactly the store's adapters, each unit still a view of its slot."""
        bank = self.adapters.bank
        return bank is not None and bank.slots == self.adapters.names and bank.linked(self.adapters)

    def _restack(self) -> None:
        """Rebuild a stale bank (adapters added or deleted, units moved by ``.to()``) before deriving graphs."""
        bank = self.adapters.bank
        if bank is not None and not self.adapters.names:  # the last adapter was deleted: nothing to route
            del self.adapters._modules[BANK]
        elif bank is not None and not self._bank_current():
            largest = max((u.r for _, u in self.adapters.iter_units()), default=bank.max_rank)
            self.adapters._modules[BANK] = build_bank(self.adapters, max(bank.max_rank, largest))

    def _set_route(self, adapter_names: Iterable[str] | None) -> None:
        """Route the next call: ``adapter_names`` (one per row), else every row to the active adapter."""
        bank = self.adapters.bank
        if adapter_names is None:
            if bank is None:
                return
            active = self.active_adapters
            if len(active) > 1:
                raise AdapterError(f"Adapters {active} are active and the adapter bank gives each row one adapter; "
                                   "pass adapter_names=[one per row] or set_adapter(one name).")
            bank.set_route(active[0] if active else BASE)
            return
        if isinstance(adapter_names, str):
            raise AdapterError("adapter_names takes one adapter name per row of the batch (a list), not a string.")
        if bank is None:
            self.build_adapter_bank()
            bank = self.adapters.bank
        bank.set_route(adapter_names)

    # ---- weighted combinations --------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             density: float | None = None, majority_sign_method: str = "total") -> dict[str, float]:
        """Add ``adapter_name``, a weighted combination of ``adapters`` on the union of their keys, with PEFT's
        combination types (see ``weighted``; ``linear`` is the exact ``Σ wᵢ sᵢ Bᵢ Aᵢ``). The new adapter has
        scaling 1 and is not made active (as in PEFT). Returns the relative SVD reconstruction error per key
        (the SVD types; also in the report). Nothing changes on error."""
        from .rules import Rule, RuleSet
        from .weighted import check_args, combine

        check_args(adapters, weights, combination_type, density, majority_sign_method, svd_rank)
        entries = [self.adapters.entry(a) for a in adapters]  # raises for an unknown name
        keys: dict[str, list] = {}
        for name, w, entry in zip(adapters, weights, entries):
            if getattr(entry, "saved", None) is not None:
                raise AdapterError(f"Adapter {name!r} has modules_to_save copies, which cannot be combined.")
            for key, unit in entry.by_key.items():
                if unit.use_dora or unit.lora_bias or unit.slices:
                    raise AdapterError(f"Adapter {name!r} uses DoRA, lora_bias or out_slices on {key!r}; a weighted "
                                       "combination takes plain whole-layer LoRA adapters.")
                keys.setdefault(key, []).append((float(w), unit))
        results = {key: combine(parts, combination_type, svd_rank, density, majority_sign_method)
                   for key, parts in keys.items()}
        ranks = {key: a.shape[0] for key, (a, _, _) in results.items()}
        dropout = next(iter(entries[0].by_key.values())).dropout_p
        by_rank: dict[int, list[str]] = {}
        for key, r in ranks.items():
            by_rank.setdefault(r, []).append(re.escape(key))
        ruleset = RuleSet([Rule("re:" + "|".join(ks), r=r, alpha=r, dropout=dropout) for r, ks in by_rank.items()])
        undo = self._add(adapter_name, ruleset, autocast_adapter_dtype=True)
        try:
            with torch.no_grad():
                for key, (a, b, _) in results.items():
                    unit = self.adapters.unit(adapter_name, key)
                    unit.lora_A.copy_(a)
                    unit.lora_B.copy_(b)
            self.adapters.entry(adapter_name).svd_error = {k: e for k, (_, _, e) in results.items() if e is not None}
            self.set_adapter(self.active_adapters or adapter_name)
        except BaseException:
            self._discard_adapter(adapter_name, undo)
            raise
        return dict(self.adapters.entry(adapter_name).svd_error)

    # ---- hot swap --------------------------------------------------------------------------------------
    def _hotswap(self, directory: Path, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Replace adapter ``name``'s weights, ranks, alphas and dropout in place (see ``load_adapter``)."""
        if name not in self.adapters.names:
            raise AdapterError(f"hotswap=True replaces an existing adapter's weights; there is no adapter {name!r} "
                               f"(adapters: {self.adapters.names}). Load it once without hotswap.")
        ruleset = ruleset_from_peft_config(config)
        if ruleset.modules_to_save or ruleset.bias != "none" or config.get("use_dora") or config.get("lora_bias"):
            raise AdapterError(f"{directory}: a hot swap replaces LoRA weights only; this adapter also has "
                               "modules_to_save, a trained bias, DoRA or lora_bias. Load it as a new adapter.")
        units = self.adapters.units(name)
        plan = _swap_plan(directory, units, tensors, ruleset)
        rank = max(r for _, r, _, _, _ in plan.values()) if plan else 0
        if self.adapters.bank is None:
            self.build_adapter_bank(max(rank, max(u.r for _, u in self.adapters.iter_units())))
        bank = self.adapters.bank
        if rank > bank.max_rank:
            raise AdapterError(f"{directory}: rank {rank} exceeds the adapter bank's maximum rank {bank.max_rank}; "
                               f"build_adapter_bank(max_rank={rank}) first (one graph rebuild).")
        with torch.no_grad():
            for key, unit in units.items():
                unit.lora_A.zero_()
                unit.lora_B.zero_()
                if key in plan:
                    a, r, alpha, rslora, dropout = plan[key]
                    b = tensors[f"{PREFIX}{key}.{unit.strategy.peft_b}"]
                    unit.lora_A[:r].copy_(a)
                    unit.lora_B[:, :r].copy_(b)
                    unit.r, unit.alpha, unit.use_rslora = r, alpha, rslora
                    unit.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        bank.sync(self.adapters)


def _swap_plan(directory: Path, units, tensors: dict[str, torch.Tensor], ruleset) -> dict[str, tuple]:
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
