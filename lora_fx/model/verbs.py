"""What each adapter verb does, as pure planners: the current state in, a ``Change`` out (the next state and the
writes to live objects its commit makes), nothing live touched. ``LoraModel`` commits a change in one transaction.

Example::

    change = plan_set(lm.state, ["a"])
    change.state.active            # ("a",)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.store import AdapterEntry, adapter_dtype, check_adapter_name
from ..adapters.tokens import TokenDelta
from ..adapters.unit import LoraUnit
from ..bank.bank import bank_refusal, plan_bank
from ..errors import AdapterError, CheckpointError, MergeError, RuleError, RuleWarning, preview
from ..passes.fold import apply, plan_fold, plan_unfold
from ..peft.checkpoint import parameter_keys
from ..rules import RuleLike, as_ruleset
from ..rules.matching import match_targets
from ..rules.model import resolve_for_model, saved_modules, token_paths
from ..targets import Target, compute_dtype
from ..variants import resolve
from ..variants.inits import is_weight_init, svd_init
from .state import LoraState


@dataclass
class Change:
    """A verb's outcome, built aside: the state to commit, the writes its commit makes (each ``effect(tx)``), the
    verb's return value, and whether the graphs must be derived again."""

    state: LoraState
    effects: list[Callable[[Any], None]] = field(default_factory=list)
    result: Any = None
    derive: bool = True


def copies(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[Any], None]:
    """An effect copying each value into its tensor."""
    def effect(tx: Any) -> None:
        for tensor, value in pairs:
            tx.copy_(tensor, value)
    return effect


def links(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> Callable[[Any], None]:
    """An effect giving each parameter other storage (a bank slot, or its own again)."""
    def effect(tx: Any) -> None:
        for param, data in pairs:
            tx.set_data(param, data)
    return effect


# ---- adapters -----------------------------------------------------------------------------------------------

def new_entry(state: LoraState, name: str, rules: RuleLike, autocast: bool,
              expect: Callable[[str, dict], None] | None = None) -> tuple[AdapterEntry, list]:
    """Adapter ``name``'s entry for the keys ``rules`` select (units initialised, not attached), and the
    ``(weight, residual)`` writes of inits that take A and B from W. ``expect(key, {suffix: shape})`` sees each
    unit's PEFT tensor shapes before anything is allocated (a checkpoint's header check)."""
    check_adapter_name(name)
    if name in state.entries:
        raise AdapterError(f"Adapter {name!r} already exists; choose another name.")
    cap = state.captured
    ruleset, saved = resolve_for_model(as_ruleset(rules), cap.source)
    for path in saved:
        block = next((b for b in cap.blocks if path == b or path.startswith(b + ".")), None)
        if block is not None and path != block:
            raise AdapterError(f"modules_to_save={path!r} lies inside the repeated block {block!r}, whose graph "
                               "all blocks share; save a module outside the blocks (a head or an embedding).")
    if (ruleset.layer_replication or None) != state.options.layer_replication:
        raise AdapterError(f"Adapter {name!r} asks for layer_replication={ruleset.layer_replication}, and this model "
                           f"was captured with {state.options.layer_replication}: replication changes the model "
                           "before capture, so lorafy (or from_peft) the model with that adapter's config.")
    matched = match_targets(cap.targets, ruleset, type(cap.source).__name__, cap.source)
    ties = tied_layers(cap, list(matched.rules_by_key), saved) if ruleset.ensure_weight_tying else {}
    units, residuals, idle = [], [], []
    peft_keys = parameter_keys([k for k, t in matched.first.items() if t.strategy.explicit], cap.source)
    for key, rule in matched.rules_by_key.items():
        if key in ties:
            continue  # the tied output layer reads its embedding's adapter (PEFT drops its own too)
        t = matched.first[key]
        variant = resolve(rule)
        if expect is not None:
            try:
                expect(peft_keys.get(key, key), variant.peft_shapes(t.strategy, t.geometry, rule.r))
            except CheckpointError as e:
                raise CheckpointError(f"{e} {variant.load_hint}" if variant.load_hint else str(e)) from None
        if rule.r > max(t.in_features, t.out_features):
            idle.append(key)
        weight = cap.weight(t)
        unit = LoraUnit(key, t.strategy, t.geometry, rule, device=weight.device,
                        dtype=adapter_dtype(compute_dtype(t, weight), autocast), variant=variant)
        unit.peft_key = peft_keys.get(key, key)
        unit.variant.init(unit, weight)
        residual = unit.variant.residual(unit, weight, _owner(cap.source, key))
        if is_weight_init(rule.init):  # PiSSA / OLoRA: A, B from W; the base keeps W - s·B A
            residual = svd_init(unit, weight)
        if residual is not None:
            if state.merge is not None:
                what = f"init={rule.init!r}" if is_weight_init(rule.init) else unit.variant.label
                raise MergeError(f"{what} rewrites base weights; unmerge() {state.merged} first.")
            residuals.append((weight, residual))
        units.append(unit)
    _refuse_exclusive_mix(state, name, units)
    if idle:
        warnings.warn(f"Adapter {name!r}: the rank exceeds both feature sizes of {preview(idle, 4)}; a rank above "
                      "min(in, out) adds parameters but no expressiveness (PEFT accepts it too).",
                      RuleWarning, stacklevel=5)
    kept = {p: copy.deepcopy(m).requires_grad_(True) for p, m in saved.items()}
    entry = AdapterEntry(units, kept, ruleset.bias, matched.unused_rules, tokens=token_deltas(ruleset, cap, units))
    entry.peft_config = ruleset.peft_config  # the user's LoraConfig, saved back as given
    entry.ties = ties
    entry.saved_ties = saved_ties(cap.source, saved) if ruleset.ensure_weight_tying else {}
    return entry, residuals


def _owner(source: Any, key: str) -> Any:
    """The model's module at ``key`` (None for a parameter target's key, which names a weight)."""
    try:
        return source.get_submodule(key)
    except AttributeError:
        return None


def _refuse_exclusive_mix(state: LoraState, name: str, units: list) -> None:
    """PEFT refuses adapters of an exclusive variant (KaSA) beside adapters without it on one model."""
    def exclusive(us) -> set[str]:
        return {u.variant.label for u in us if u.variant.exclusive}
    mine = exclusive(units)
    for other, entry in state.entries.items():
        theirs = exclusive(entry.by_key.values())
        if theirs != mine:
            label = " / ".join(sorted(mine | theirs))
            raise AdapterError(f"Adapter {name!r} {'uses' if mine else 'does not use'} {label} and adapter {other!r} "
                               f"{'does' if theirs else 'does not'}: {label} rewrites the base weights, so PEFT "
                               "refuses to mix it with other adapters on one model. Use a separate model.")


def saved_ties(source: Any, saved: dict) -> dict[str, str]:
    """PEFT's ``ensure_weight_tying`` for ``modules_to_save``: {module path: saved path} for the modules reading
    a saved module's weight (a tied ``lm_head``), which then read the trained copy too."""
    out = {}
    for path, module in saved.items():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        for other, m in source.named_modules():
            if other != path and not other.startswith(path + ".") and getattr(m, "weight", None) is weight:
                out[other] = path
    return out


def tied_layers(cap: Any, keys: list[str], saved: dict) -> dict[str, str]:
    """PEFT's ``ensure_weight_tying``: for each embedding target among ``keys``, the linear targets of the outer
    graph reading the same weight (a tied ``lm_head``), as {output layer key: embedding key}. Warns, as PEFT does,
    when there is nothing to tie."""
    targets = [t for t in cap.targets if isinstance(t, Target) and not t.inert]
    ties = {}
    for e in (t for t in targets if t.key in keys and t.kind == "embedding"):
        weight = cap.weight(e)
        for t in targets:
            if t.kind == "linear" and t.key != e.key and cap.weight(t) is weight:
                if t.block:
                    raise AdapterError(f"ensure_weight_tying: {t.key!r} reads {e.key!r}'s weight inside a repeated "
                                       "block; only an output layer outside the blocks can share the adapter.")
                ties[t.key] = e.key
    if not ties and not saved:
        warnings.warn("ensure_weight_tying=True, but no targeted embedding has a tied output layer (is "
                      "tie_word_embeddings set?); nothing is tied.", RuleWarning, stacklevel=5)
    return ties


def token_deltas(ruleset: Any, cap: Any, units: list) -> dict[str, TokenDelta]:
    """The adapter's trainable tokens (PEFT's ``trainable_token_indices``), initialised to the current rows."""
    paths = token_paths(ruleset, cap.source, saved_modules(ruleset, cap.source))
    keys = {u.key for u in units}
    out = {}
    for path, rows in paths.items():
        if path in keys:
            raise AdapterError(f"{path!r} has LoRA and trainable_token_indices; give it one of them (the trainable "
                               "tokens train its rows directly).")
        try:
            out[path] = TokenDelta(cap.source.get_submodule(path).weight, rows)
        except ValueError as e:
            raise RuleError(f"trainable_token_indices on {path!r}: {e}.") from None
    return out


def with_entry(state: LoraState, name: str, entry: AdapterEntry, residuals: list | None = None,
               frozen: bool = False) -> Change:
    """The change that adds ``entry`` as adapter ``name`` (active if nothing is; the bank, if any, restacked)."""
    active = state.active or (name,)
    new = state.next(entries={**state.entries, name: entry}, active=active,
                     frozen=state.frozen | {name} if frozen else state.frozen - {name})
    check_active(new, list(active))
    change = Change(new, [copies(residuals)] if residuals else [])
    if serving_bank(new):  # a compiled model banks its adapters now: switching to the new one rebuilds nothing
        bank, pairs = plan_bank(new.entries, None, active[0] if len(active) == 1 else None)
        change.state = new.next(bank=bank)
        change.effects.append(links(pairs))
        return change
    return restack(change)


def serving_bank(state: LoraState) -> bool:
    """Whether a model compiled whole (``lora_fx.compile``) should bank its adapters: several, none merged, all
    bankable, no bank yet."""
    return (state.bank is None and state.options.graph_compile is not None and state.merge is None
            and len(state.entries) > 1 and not state.options.sharded and bank_refusal(state.entries) is None)


def plan_add(state: LoraState, name: str, rules: RuleLike, autocast: bool = True) -> Change:
    entry, residuals = new_entry(state, name, rules, autocast)
    return with_entry(state, name, entry, residuals)


def check_active(state: LoraState, names: list[str]) -> None:
    for name in names:
        state.entry(name)  # raises for an unknown name
    saved = [p for name in names for p in state.entries[name].saved_copies()]
    if len(saved) != len(set(saved)):
        raise AdapterError(f"Adapters {names} each keep a trained copy of the same module (modules_to_save); "
                           "only one of them can be active at a time (PEFT refuses this too).")


def plan_set(state: LoraState, names: str | Iterable[str]) -> Change:
    """Make ``names`` the active adapters (routed graphs do not change: only the default route does)."""
    names = [names] if isinstance(names, str) else list(names)
    check_active(state, names)
    if state.merge is not None and names != list(state.active):
        raise MergeError(f"Adapters {state.merged} are merged into the weights; unmerge() before set_adapter.")
    new = state.next(active=names)
    if serving_bank(state):
        default = names[0] if len(names) == 1 else None  # a compiled model banks its adapters: later switches
        bank, pairs = plan_bank(state.entries, None, default)  # recompile nothing
        return Change(state.next(active=names, bank=bank), [links(pairs)])
    if state.bank is None:
        return Change(new)
    slot = state.bank.slot_of(names[0]) if len(names) == 1 else state.bank.base
    route = torch.full_like(state.bank.default_route, slot)
    return Change(new, [copies([(state.bank.default_route, route)])], derive=False)


def plan_replace(state: LoraState, name: str, rules: RuleLike, tensors: dict[str, dict[str, torch.Tensor]]) -> Change:
    """Adapter ``name`` rebuilt from ``rules`` (units' tensors from ``tensors``: key -> {attribute: value}), keeping its
    place among the active adapters."""
    old = state.entry(name)
    if name in state.merged:
        raise MergeError(f"Adapter {name!r} is merged into the weights; unmerge() before replacing it.")
    without = state.next(entries={n: e for n, e in state.entries.items() if n != name})
    entry, residuals = new_entry(without, name, rules, autocast=True)
    entry.peft_config = old.peft_config
    with torch.no_grad():
        for key, values in tensors.items():
            for attr, value in values.items():
                target = getattr(entry.by_key[key], attr)
                if tuple(target.shape) != tuple(value.shape):
                    raise AdapterError(f"{attr} of {key!r}: shape {tuple(value.shape)}, the new unit's is "
                                       f"{tuple(target.shape)}.")
                target.copy_(value)
    change = with_entry(without, name, entry, residuals, frozen=name in state.frozen)
    change.state = change.state.next(active=state.active)
    return restack(change)


def plan_delete(state: LoraState, name: str) -> Change:
    if name in state.merged:
        raise MergeError(f"Adapter {name!r} is merged into the weights; unmerge() before deleting it.")
    state.entry(name)
    entries = {n: e for n, e in state.entries.items() if n != name}
    new = state.next(entries=entries, active=[a for a in state.active if a != name], frozen=state.frozen - {name})
    return restack(Change(new))


def restack(change: Change, max_rank: int | None = None) -> Change:
    """``change`` with the adapter bank (if its state has one) rebuilt over its adapters and linked at commit (a
    bank over no adapter is dropped)."""
    state = change.state
    if state.bank is None:
        return change
    if not state.entries:
        change.state = state.next(bank=None)
        return change
    largest = max(u.r for _, u in state.iter_units())
    rank = max(max_rank or state.bank.max_rank, largest)
    default = state.active[0] if len(state.active) == 1 else None
    bank, pairs = plan_bank(state.entries, rank, default)
    change.state = state.next(bank=bank)
    change.effects.append(links(pairs))
    return change


# ---- merging ------------------------------------------------------------------------------------------------

def plan_merge(state: LoraState, adapter_names: str | Iterable[str] | None, *, safe: bool = False,
               keep_original: bool = True, progress: Callable[[str], None] | None = None) -> Change:
    if state.merge is not None:
        raise MergeError(f"Adapters {state.merged} are already merged; unmerge() before merging again.")
    if state.bank is not None:
        raise MergeError("Adapters are routed per row through an adapter bank; merging would fold them into "
                         "weights every row shares. remove_adapter_bank() first.")
    names = list(state.active) if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(dict.fromkeys(adapter_names)))
    if not names:
        raise MergeError("No adapter to merge: no adapter is active; pass adapter_names=[...].")
    units_by_key: dict[str, list] = {}
    for name in names:
        for key, unit in state.entry(name).by_key.items():
            units_by_key.setdefault(key, []).append((name, unit))
    targets: dict[str, list[Target]] = {}
    for t in state.captured.targets:
        if isinstance(t, Target):
            targets.setdefault(t.key, []).append(t)
    in_place = {emb for name in names for emb in state.entry(name).ties.values()}  # the tied head follows
    writes = plan_fold(state.captured, targets, units_by_key, names, safe=safe, keep_original=keep_original,
                       progress=progress, in_place=in_place)
    gm = state.captured.graph_module
    return Change(state.next(merge=writes.state), [lambda tx: apply(writes, tx, gm)])


def plan_unmerge(state: LoraState) -> Change:
    if state.merge is None:
        raise MergeError("Nothing is merged; call merge() first.")
    writes = plan_unfold(state.captured, state.merge)
    gm = state.captured.graph_module
    return Change(state.next(merge=None), [lambda tx: apply(writes, tx, gm)])
