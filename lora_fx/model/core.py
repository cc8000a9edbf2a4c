"""LoraModel: the captured model and its adapter state, with the verbs that change it.

Its state is one immutable value (``lm.state``, ``state.LoraState``). Every verb is a transaction: a planner
(``verbs``, ``checkpoints``, ``bank.swap``) computes the next state and its writes aside, the graphs are derived
for it aside (``passes.build``), and ``_commit`` makes it all live in one step, rolled back entirely if anything
raises (``KeyboardInterrupt`` included). Verbs are serialised and calls run between them (``StateLock``).

Example::

    lm = lorafy(model, ["q_proj", "v_proj"])
    lm.print_trainable_parameters()
    loss = lm(x).sum(); loss.backward()       # only lm.adapters' parameters get gradients
    print(lm.report())
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..adapters.store import AdapterStore
from ..bank.bank import own_storage, plan_bank
from ..capture import Captured
from ..capture.blocks import Block, code_of
from ..errors import AdapterError, MergeError
from ..passes import build, install
from ..passes.fold import HOLDER
from ..peft.compat import PeftCompatMixin
from ..rules import RuleLike
from ..targets import Target
from .calls import CallsMixin
from .checkpoints import CheckpointMixin
from .combine import plan_weighted
from .dtypes import DtypeMixin
from .graphs import DerivedGraphsMixin, Entry, GraphCache
from .report import ReportMixin
from .state import LoraState, Options
from .transaction import StateLock, Transaction
from .unloaded import serve_like
from .verbs import (
    Change,
    copies,
    links,
    plan_add,
    plan_delete,
    plan_merge,
    plan_replace,
    plan_set,
    plan_unmerge,
    restack,
)


class LoraModel(CallsMixin, CheckpointMixin, ReportMixin, DtypeMixin, DerivedGraphsMixin, PeftCompatMixin,
                nn.Module):
    """A captured model with LoRA branches as graph rewrites. Call it as you would call the model."""

    def __init__(self, captured: Captured, *, fuse: bool = True, fused_loss: bool = False,
                 layer_replication: tuple | None = None) -> None:
        nn.Module.__init__(self)  # not super(): with PEFT installed a PeftModel is in the MRO (see peft.compat)
        self.graph_module = captured.graph_module
        store_name = "lora" if not hasattr(self.graph_module, "lora") else "lora_fx_store"
        store = AdapterStore()
        self.graph_module.add_module(store_name, store)
        self._state = LoraState(captured, store, store_name, options=Options(fuse=fuse, fused_loss=fused_loss,
                                                                         layer_replication=layer_replication))
        self._lock = StateLock()
        self._graphs = GraphCache()
        self._records: list = []
        self._requires_grad = [(p, p.requires_grad) for p in self.graph_module.parameters()]
        self._init_calls()
        self._ready = True

    def __getattr__(self, name: str) -> Any:
        """Parameters, buffers and submodules; then, as PEFT does, the wrapped model's attributes (``config``)."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            state = self.__dict__.get("_state")
            if state is None or name.startswith("_"):
                raise
            return getattr(state.captured.source, name)

    # ---- reading the state ----------------------------------------------------------------------------------
    @property
    def state(self) -> LoraState:
        """The committed state (immutable; each verb commits a new one)."""
        return self._state

    @property
    def fuse(self) -> bool:
        return self._state.options.fuse

    @property
    def adapters(self) -> AdapterStore:
        store = getattr(self.graph_module, self._state.store_name, None)
        if store is None:
            raise AdapterError("This LoraModel was unloaded (merge_and_unload / unload); use the graph module "
                               "those returned, or lorafy the model again.")
        return store

    @property
    def active_adapters(self) -> list[str]:
        return list(self._state.active)

    @property
    def merged_adapters(self) -> list[str]:
        return self._state.merged

    @property
    def adapter_bank(self) -> Any:
        """The adapter bank when adapters are routed per row (``build_adapter_bank``), else None."""
        return self._state.bank

    @property
    def targets(self) -> list[Target]:
        """Every adaptable target of the captured model (full keys, model order)."""
        return [t for t in self._state.captured.targets if isinstance(t, Target)]

    @property
    def blocks(self) -> dict[str, Block]:
        """The repeated blocks kept as submodules of ``graph_module``, by path (empty for a one-piece graph)."""
        return dict(self._state.captured.blocks)

    @property
    def code(self) -> str:
        """The outer graph's code, then each distinct block program's code."""
        return code_of(self.graph_module)

    def unit(self, key: str, adapter_name: str | None = None) -> Any:
        """The LoraUnit of ``key`` in ``adapter_name`` (default: the first active adapter)."""
        return self.adapters.unit(adapter_name or self.active_adapters[0], key)

    def train(self, mode: bool = True) -> LoraModel:
        """Switch LoRA dropout and the base model's mode (an exported model: its capture of that mode, see
        ``base_mode``)."""
        self.training = self._base_training = mode
        if self._state.captured.mode_fixed:
            self.adapters.train(mode)
        else:
            self.graph_module.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if getattr(self, "_ready", False) and hasattr(self.graph_module, self._state.store_name):
            self._graphs.clear()  # their KV caches have the old dtype and device
            self.refresh()  # dtype casts in the graph follow the new dtypes; a bank is restacked
        return out

    # ---- the verb machinery -------------------------------------------------------------------------------
    def _verb(self, planner: Callable[[LoraState], Change]) -> Any:
        """Plan against the committed state and commit, with no call or other verb in between."""
        with self._lock.write():
            self.adapters  # noqa: B018  (raises once the model was unloaded)
            change = planner(self._state)
            self._commit(change)
            return change.result

    def _commit(self, change: Change) -> None:
        """Make ``change`` live: its writes, the store's children, the graphs, the trainable flags, the state."""
        new = replace(change.state, derived=change.state.version) if change.derive else change.state
        derived = build(new.captured, new.plan()) if change.derive else None
        with Transaction() as tx:
            for effect in change.effects:
                effect(tx)
            self._sync_store(tx, new)
            if derived is not None:
                install(derived, tx)
                tx.setattr(self, "_records", derived.records)
            self._freeze(tx, new)
            tx.setattr(self, "_state", new)

    def _sync_store(self, tx: Transaction, new: LoraState) -> None:
        store = new.store
        old = store.held()
        if old != (dict(new.entries), new.bank):
            tx.call(lambda: store.hold(new.entries, new.bank), lambda: store.hold(*old))
        tx.setattr(store, "active", list(new.active))

    def _freeze(self, tx: Transaction, state: LoraState) -> None:
        """Exactly the state's trainable parameters require grad: its adapters' and the base biases they train."""
        trains = state.trainable()
        for name in (state.names if state.bank is not None else state.active):
            if name not in state.frozen:
                trains.update(id(p) for p in self.bias_parameters(name, state).values())
        for p in self.graph_module.parameters():
            tx.requires_grad(p, id(p) in trains)

    def run_state(self, entry: Entry | None, fn: Callable[[], Any]) -> Any:
        """``fn()`` while no verb commits, with ``entry`` (None: the training graph) derived for the committed state:
        the seam every call of a graph goes through."""
        if torch.compiler.is_compiling():
            return fn()
        with self._lock.read():
            if entry is None or entry.version == self._state.derived:
                return fn()
        with contextlib.ExitStack() as reading:
            with self._lock.write():
                self._derive_entry(entry)
                reading.enter_context(self._lock.read())  # held past the write: no commit in between
            return fn()

    def reading(self) -> Any:
        """A context in which no verb commits (calls hold it while they run graphs of one state version)."""
        return self._lock.read()

    def configure(self, **options: Any) -> None:
        """Change options (``compile_options``, ``sharded``) as a verb; the graphs do not change."""
        self._verb(lambda s: Change(s.next(options=replace(s.options, **options)), derive=False))

    # ---- adapters ---------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, rules: RuleLike, *, autocast_adapter_dtype: bool = True) -> None:
        """Create adapter ``adapter_name`` for the keys ``rules`` select. As in PEFT, it becomes active only
        when no adapter is active yet (use ``set_adapter``). Nothing changes if the rules are invalid or
        match nothing."""
        self._verb(lambda s: plan_add(s, adapter_name, rules, autocast_adapter_dtype))

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Make ``names`` the active adapter(s): the graph computes them, only they are trainable."""
        self._verb(lambda s: plan_set(s, names))

    def delete_adapter(self, adapter_name: str) -> None:
        self._verb(lambda s: plan_delete(s, adapter_name))

    def replace_adapter(self, adapter_name: str, rules: RuleLike,
                        tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Rebuild adapter ``adapter_name`` from ``rules`` in one verb (all or nothing), its units' tensors set from
        ``tensors`` ({key: {"lora_A": ...}}) where given; it stays as active as it was (EVA's rank redistribution)."""
        self._verb(lambda s: plan_replace(s, adapter_name, rules, tensors or {}))

    def refresh(self) -> None:
        """Rebuild the graphs from the pristine captured ones and the adapter state (a bank is restacked from the
        units, which a dtype or device change gave storage of their own)."""
        self._verb(lambda s: restack(Change(s.next())))

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             density: float | None = None, majority_sign_method: str = "total") -> dict[str, float]:
        """Add ``adapter_name``, a weighted combination of ``adapters`` on the union of their keys, with PEFT's
        combination types (see ``adapters.weighted``; ``linear`` is the exact ``Σ wᵢ sᵢ Bᵢ Aᵢ``). The new adapter
        has scaling 1 and is not made active (as in PEFT). Returns the relative SVD reconstruction error per key
        (the SVD types; also in the report). Nothing changes on error."""
        return self._verb(lambda s: plan_weighted(s, adapters, weights, adapter_name, combination_type, svd_rank,
                                                  density, majority_sign_method))

    # ---- merging ----------------------------------------------------------------------------------------------
    def merge(self, adapter_names: str | Iterable[str] | None = None, *, safe: bool = False,
              keep_original: bool = True, progress: Callable[[str], None] | None = None) -> None:
        """Fold ``W += s·ΔW`` (float32, cast back once) for the adapters (default: the active ones) and erase
        their branches from the graph. ``safe``: check the merged weights are finite before committing.
        ``keep_original``: keep an exact copy of each W so ``unmerge`` restores it bit for bit. ``progress`` is
        called with each key as its merged weight is computed (before anything is written)."""
        self._verb(lambda s: plan_merge(s, adapter_names, safe=safe, keep_original=keep_original,
                                        progress=progress))

    def unmerge(self) -> None:
        """Restore the base weights (and ties) and put the merged adapters' branches back in the graph."""
        self._verb(plan_unmerge)

    def merge_adapter(self, adapter_names: str | Iterable[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's name for ``merge`` (its ``safe_merge`` is ``safe``)."""
        self.merge(adapter_names, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's name for ``unmerge``."""
        self.unmerge()

    def merge_and_unload(self, *, safe: bool = False) -> torch.fx.GraphModule:
        """Merge (if not merged yet) and return the graph module with folded weights and no LoRA nodes,
        parameters or store: a plain GraphModule to compile or export. This LoraModel is done afterwards."""
        with self._lock.write():
            if self._state.merge is None:
                self.merge(safe=safe, keep_original=False)
            return self._unload(keep_untied=True, merge_tokens=True)

    def unload(self) -> torch.fx.GraphModule:
        """The base graph with no LoRA, weights as they were before any merge (as in PEFT, the active
        adapter's trained copies of ``modules_to_save`` replace the originals)."""
        with self._lock.write():
            if self._state.merge is not None:
                self.unmerge()
            return self._unload()

    def _unload(self, keep_untied: bool = False, keep_saved: bool = True,
                merge_tokens: bool = False) -> torch.fx.GraphModule:
        """The last verb of a LoraModel: the graphs without adapters, the store detached (``merge_tokens``: the
        active adapters' trainable tokens written into their weights' rows, as PEFT's merge_and_unload does)."""
        state = self._state
        gm, store = self.graph_module, state.store
        plan = state.plan(adapters=False)
        if not keep_untied:
            plan = type(plan)({}, plan.fuse, {}, {})
        derived = build(state.captured, plan)
        with Transaction() as tx:
            if state.bank is not None:
                links(own_storage(state.entries))(tx)
                old = store.held()
                tx.call(lambda: store.hold(state.entries, None), lambda: store.hold(*old))
            if keep_saved:  # the active adapter's trained copies of modules_to_save replace the originals
                for name in state.active:
                    for path, (_, module) in state.entries[name].saved_copies().items():
                        pairs = [(gm.get_parameter(f"{path}.{n}"), p) for n, p in module.named_parameters()]
                        pairs += [(gm.get_buffer(f"{path}.{n}"), b) for n, b in module.named_buffers()]
                        copies(pairs)(tx)
            if merge_tokens:
                for path, deltas in state.token_paths().items():
                    weight = gm.get_parameter(f"{path}.weight")
                    rows = weight.detach()
                    for delta_path in deltas:
                        t = gm.get_submodule(delta_path)
                        rows = rows.index_copy(0, t.indices, t.delta.detach().to(rows.dtype))
                    copies([(weight, rows)])(tx)
            install(derived, tx)
            for p in store.parameters():
                tx.requires_grad(p, False)
            tx.add_module(gm, state.store_name, None)
            for block in state.captured.blocks.values():
                tx.add_module(block, "lora_dropout", None)
            if not plan.untied and hasattr(gm, HOLDER):
                tx.add_module(gm, HOLDER, None)
            tx.setattr(self, "_state", state.next(merge=None, bank=None))
        self._graphs.clear()  # other call signatures' graphs read the store: they go with it
        return serve_like(gm, state.captured.source, bool(plan.untied))

    def discard(self) -> None:
        """Undo what creating this LoraModel did (a failed lorafy / from_peft): no store, the captured graph,
        the base parameters' ``requires_grad`` as they were."""
        with self._lock.write():
            self._unload(keep_saved=False)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def release_snapshot(self) -> None:
        """Forget the ``requires_grad`` snapshot taken at creation (kept only until lorafy succeeds)."""
        self._requires_grad = []

    # ---- the adapter bank ----------------------------------------------------------------------------------
    def build_adapter_bank(self, max_rank: int | None = None) -> None:
        """Stack every adapter in the store (one slot each, in store order, plus ``"__base__"``) padded to
        ``max_rank`` (default: the largest rank in the store) and route the graphs through it. Hot swaps then
        take any rank up to ``max_rank``; adding or deleting an adapter rebuilds the bank (one graph rebuild).
        Refuses adapters the bank cannot route (DoRA, a LoRA bias, output slices, modules_to_save, trained biases)."""
        self._verb(lambda s: plan_build_bank(s, max_rank))

    def remove_adapter_bank(self) -> None:
        """Give each adapter its own tensors at its true rank again and rebuild the graphs unrouted."""
        def plan(state: LoraState) -> Change:
            if state.bank is None:
                raise AdapterError("There is no adapter bank to remove.")
            return Change(state.next(bank=None), [links(own_storage(state.entries))])
        self._verb(plan)


def plan_build_bank(state: LoraState, max_rank: int | None) -> Change:
    if state.merge is not None:
        raise MergeError(f"Adapters {state.merged} are merged into the weights every row shares; unmerge() before "
                         "building an adapter bank.")
    if state.options.sharded:
        raise AdapterError("An adapter bank cannot be built on a model sharded with FSDP2 (its slots are views of "
                           "one stacked tensor per target); build it before fully_shard or serve unsharded.")
    default = state.active[0] if len(state.active) == 1 else None
    bank, pairs = plan_bank(state.entries, max_rank, default)
    return Change(state.next(bank=bank), [links(pairs)])
