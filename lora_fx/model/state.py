"""The state of a LoraModel as one immutable value: the captured model, the store and its adapters, which are
active, what is merged, the adapter bank, the options, and a version. A verb computes the next state aside and
commits it (``LoraModel``); graphs are derived from a state (``plan``) and stamped with the version they follow
(``derived``: a verb that changes no graph, such as a hot swap into the bank, keeps every derived graph valid).

Example::

    s = lm.state
    s.version, s.active, s.merged, [a for a in s.names]
    plan = s.plan()                       # what the graphs compute for this state
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..adapters.store import BANK, AdapterEntry, AdapterStore
from ..errors import AdapterError
from ..passes.fold import MergeState
from ..passes.plan import RewritePlan, RoutedBranch, UnitBranch
from ..variants.tied import TiedView


@dataclass(frozen=True)
class Options:
    fuse: bool = True  # run eligible linear branches through the sibling-fusion pass
    fused_loss: bool = False  # compute the model's LM loss without materialising the logits
    compile_options: Mapping[str, Any] | None = None  # set by lora_fx.compile: generation compiles its steps so
    graph_compile: Mapping[str, Any] | None = None  # lora_fx.compile of the whole model: its graphs are compiled
    sharded: bool = False  # lora_fx.fully_shard: only the first capture's graph runs
    layer_replication: tuple | None = None  # PEFT's layer map the model was replicated with before capture


@dataclass(frozen=True)
class LoraState:
    """What a LoraModel is. ``entries`` are the store's adapters (name -> entry, in store order)."""

    captured: Any  # capture.Captured: the first capture (its graph module is ``lm.graph_module``)
    store: AdapterStore
    store_name: str
    entries: Mapping[str, AdapterEntry] = field(default_factory=dict)  # never mutated: ``next`` makes a new one
    active: tuple[str, ...] = ()
    merge: MergeState | None = None
    bank: Any = None  # bank.AdapterBank when adapters are routed per row
    frozen: frozenset[str] = frozenset()  # adapters loaded with is_trainable=False
    options: Options = Options()
    version: int = 0
    derived: int = 0  # the version whose plan the graphs follow (a verb that changes no graph keeps it)

    def next(self, **changes: Any) -> LoraState:
        """The state after a verb: ``changes`` applied, the version bumped."""
        if "entries" in changes:
            changes["entries"] = dict(changes["entries"])
        if "active" in changes:
            changes["active"] = tuple(changes["active"])
        return replace(self, **changes, version=self.version + 1)

    # ---- reading --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> AdapterEntry:
        if name not in self.entries:
            raise AdapterError(f"No adapter named {name!r}; adapters: {self.names}.")
        return self.entries[name]

    def iter_units(self) -> Iterator[tuple[str, Any]]:
        for name, entry in self.entries.items():
            for unit in entry.by_key.values():
                yield name, unit

    @property
    def merged(self) -> list[str]:
        return list(self.merge.adapters) if self.merge is not None else []

    @property
    def live(self) -> list[str]:
        """The adapters whose branches the graphs compute: the active ones not merged."""
        return [a for a in self.active if a not in self.merged]

    def unit_path(self, name: str, key: str) -> str:
        """Attribute path of a unit from the graph module, e.g. ``lora.default.model_layers_0_q_proj``."""
        return f"{self.store_name}.{name}.{self.entries[name].child[key]}"

    def saved_paths(self) -> dict[str, str]:
        """Module path -> path of the copy the graphs read instead (the first active adapter's copy of each)."""
        out: dict[str, str] = {}
        for name in self.active:
            for path, (rel, _) in self.entries[name].saved_copies().items():
                out.setdefault(path, f"{self.store_name}.{name}.{rel}")
        return out

    def saved_tie_paths(self) -> dict[str, str]:
        """Module path -> the saved module path whose copy's weight it reads (ensure_weight_tying)."""
        out: dict[str, str] = {}
        for name in self.active:
            for path, saved in self.entries[name].saved_ties.items():
                out.setdefault(path, saved)
        return out

    def token_paths(self) -> dict[str, tuple[str, ...]]:
        """Module path -> paths of the active adapters' trainable tokens on its weight (applied in order)."""
        out: dict[str, tuple[str, ...]] = {}
        for name in self.active:
            for path, (rel, _) in self.entries[name].token_deltas().items():
                out[path] = (*out.get(path, ()), f"{self.store_name}.{name}.{rel}")
        return out

    # ---- deriving -------------------------------------------------------------------------------------
    def plan(self, *, prefix: str = "", strip: str = "", adapters: bool = True) -> RewritePlan:
        """What the graphs compute for this state. ``strip`` / ``prefix``: where a capture's root sits in the model
        (saved-module paths are renamed accordingly); ``adapters=False``: no branch at all (unload)."""
        saved = {prefix + p[len(strip):]: v for p, v in self.saved_paths().items() if p.startswith(strip)}
        tokens = {prefix + p[len(strip):]: v for p, v in self.token_paths().items() if p.startswith(strip)}
        ties = {prefix + p[len(strip):]: prefix + v[len(strip):] for p, v in self.saved_tie_paths().items()
                if p.startswith(strip) and v.startswith(strip)}
        untied = self.merge.untied if self.merge is not None else {}
        if not adapters:
            return RewritePlan({}, self.options.fuse, {}, untied)
        loss = self.options.fused_loss
        if self.bank is not None:
            bank_path = f"{self.store_name}.{BANK}"
            branches = {key: RoutedBranch(tuple(self._slot(a, key) for a in self.bank.slots), bank_path, stem,
                                          self.bank.dropouts[stem]) for key, stem in self.bank.stems.items()}
            return RewritePlan(branches, self.options.fuse, saved, untied, f"{bank_path}.default_route", loss)
        branches: dict[str, tuple] = {}
        for name in self.live:
            entry = self.entries[name]
            for key, unit in entry.by_key.items():
                branches[key] = (*branches.get(key, ()), UnitBranch(name, unit, self.unit_path(name, key)))
            for head, emb in entry.ties.items():
                branch = UnitBranch(name, TiedView(entry.by_key[emb]), self.unit_path(name, emb))
                branches[head] = (*branches.get(head, ()), branch)
        return RewritePlan(branches, self.options.fuse, saved, untied, fused_loss=loss, tokens=tokens,
                           saved_ties=ties)

    def _slot(self, name: str, key: str) -> tuple:
        unit = self.entries[name].by_key.get(key) if name in self.entries else None
        return name, unit, self.unit_path(name, key) if unit is not None else None

    def trainable(self) -> set[int]:
        """ids of the store parameters that train in this state: the active adapters' (every adapter of a bank),
        their modules_to_save copies; not those of frozen adapters."""
        routed = self.names if self.bank is not None else self.active
        out: set[int] = set()
        for name in routed:
            if name in self.frozen:
                continue
            entry: nn.Module = self.entries[name]
            fixed = {id(getattr(u, t)) for u in entry.by_key.values() for t in u.variant.frozen}
            out.update(id(p) for p in entry.parameters() if id(p) not in fixed)
        return out
