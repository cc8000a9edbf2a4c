"""LoraModel: the captured model, its adapter store and the verbs that act on them.

Every verb changes state (the store, the active adapters, the merge state) and then rebuilds the graphs from
the pristine captured ones (``passes.derive``); a verb that fails leaves the state and graphs as they were.

Example::

    lm = lorafy(model, ["q_proj", "v_proj"])
    lm.print_trainable_parameters()
    loss = lm(x).sum(); loss.backward()       # only lm.adapters' parameters get gradients
    print(lm.report())
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .bank import BANK, unbank
from .blocks import Block, code_of
from .capture import Captured
from .errors import AdapterError, MergeError
from .init_schemes import is_weight_init, svd_init
from .matching import match_targets
from .merge import HOLDER, MergeState, fold, unfold
from .model_bank import BankMixin
from .model_calls import CallsMixin
from .model_io import CheckpointMixin
from .model_report import ReportMixin
from .passes import Rewrite, derive
from .peft_compat import PeftCompatMixin
from .rules import RuleLike, as_ruleset, resolve_for_model
from .store import AdapterEntry, AdapterStore, LoraUnit, adapter_dtype, check_adapter_name
from .targets import Target, base_weight, compute_dtype


class LoraModel(CallsMixin, BankMixin, CheckpointMixin, ReportMixin, PeftCompatMixin, nn.Module):
    """A captured model with LoRA branches as graph rewrites. Call it as you would call the model."""

    def __init__(self, captured: Captured, *, fuse: bool = True) -> None:
        nn.Module.__init__(self)  # not super(): with PEFT installed a PeftModel is in the MRO (see peft_compat)
        self.fuse = fuse  # run eligible linear branches through the sibling-fusion pass
        self.graph_module = captured.graph_module
        self._captured = captured
        self._requires_grad = [(p, p.requires_grad) for p in self.graph_module.parameters()]
        self._store_name = "lora" if not hasattr(self.graph_module, "lora") else "lora_fx_store"
        self.graph_module.add_module(self._store_name, AdapterStore())
        self._merge: MergeState | None = None
        self._records: list[dict] = []
        self._version = 0  # bumped by every rebuild: derived generation graphs follow lazily
        self._generation: dict = {}  # (batch, cache length) -> generation.GenerationGraphs
        self._compile_options: dict | None = None  # set by lora_fx.compile; generation compiles its decode step
        self._init_calls()
        self._ready = True

    # ---- calling (forward, generate, checkpointing: model_calls) --------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Parameters, buffers and submodules; then, as PEFT does, the wrapped model's attributes (``config``)."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            captured = self.__dict__.get("_captured")
            if captured is None or name.startswith("_"):
                raise
            return getattr(captured.source, name)

    @property
    def adapters(self) -> AdapterStore:
        store = getattr(self.graph_module, self._store_name, None)
        if store is None:
            raise AdapterError("This LoraModel was unloaded (merge_and_unload / unload); use the graph module "
                               "those returned, or lorafy the model again.")
        return store

    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapters.active)

    @property
    def targets(self) -> list[Target]:
        """Every adaptable target of the captured model (full keys, model order)."""
        return [t for t in self._captured.targets if isinstance(t, Target)]

    @property
    def blocks(self) -> dict[str, Block]:
        """The repeated blocks kept as submodules of ``graph_module``, by path (empty for a one-piece graph)."""
        return dict(self._captured.blocks)

    @property
    def code(self) -> str:
        """The outer graph's code, then each distinct block program's code."""
        return code_of(self.graph_module)

    def train(self, mode: bool = True) -> LoraModel:
        """Switch LoRA dropout (and the base graph too, unless its mode was fixed by torch.export)."""
        self.training = mode
        if self._captured.mode_fixed:
            self.adapters.train(mode)
        else:
            self.graph_module.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if getattr(self, "_ready", False) and hasattr(self.graph_module, self._store_name):
            self._generation.clear()  # their KV caches have the old dtype and device
            self.refresh()  # dtype casts in the graph follow the new dtypes
        return out

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, rules: RuleLike, *, autocast_adapter_dtype: bool = True) -> None:
        """Create adapter ``adapter_name`` for the keys ``rules`` select. As in PEFT, it becomes active only
        when no adapter is active yet (use ``set_adapter``). Nothing changes if the rules are invalid or
        match nothing."""
        undo = self._add(adapter_name, rules, autocast_adapter_dtype)
        try:
            self.set_adapter(self.active_adapters or adapter_name)
        except BaseException:
            self._discard_adapter(adapter_name, undo)
            raise

    def _add(self, adapter_name: str, rules: RuleLike, autocast_adapter_dtype: bool) -> list:
        """Create the adapter's units and add them to the store (inactive); returns the undo of any base weights
        rewritten by PiSSA/OLoRA, for ``_discard_adapter``."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters.names:
            raise AdapterError(f"Adapter {adapter_name!r} already exists; choose another name.")
        ruleset, saved = resolve_for_model(as_ruleset(rules), self._captured.source)
        for path in saved:
            block = next((b for b in self._captured.blocks if path == b or path.startswith(b + ".")), None)
            if block is not None and path != block:
                raise AdapterError(f"modules_to_save={path!r} lies inside the repeated block {block!r}, whose graph "
                                   "all blocks share; save a module outside the blocks (a head or an embedding).")
        matched = match_targets(self._captured.targets, ruleset, type(self._captured.source).__name__)
        units, residuals, first = [], [], matched.first
        for key, rule in matched.rules_by_key.items():
            t = first[key]
            weight = base_weight(self.graph_module, t.weight_path)
            unit = LoraUnit(key, t.strategy, t.geometry, rule, device=weight.device,
                            dtype=adapter_dtype(compute_dtype(t, weight), autocast_adapter_dtype))
            if rule.use_dora:
                if unit.lora_A.dtype != weight.dtype:
                    raise AdapterError(f"DoRA on {key!r} needs adapters in the base weight's dtype ({weight.dtype}); "
                                       "pass autocast_adapter_dtype=False.")
                unit.init_magnitude(weight)
            if is_weight_init(rule.init):  # PiSSA / OLoRA: A, B from W; the base keeps W - s·B A
                if self._merge is not None:
                    raise MergeError(f"init={rule.init!r} rewrites base weights; unmerge() {self._merge.adapters} "
                                     "first.")
                residuals.append((weight, svd_init(unit, weight)))
            units.append(unit)
        copies = {p: copy.deepcopy(m).requires_grad_(True) for p, m in saved.items()}
        self.adapters.add(adapter_name, AdapterEntry(units, copies, ruleset.bias, matched.unused_rules))
        undo = [(w, w.detach().clone()) for w, _ in residuals]
        with torch.no_grad():
            for weight, residual in residuals:
                weight.copy_(residual)
        return undo

    def _discard_adapter(self, adapter_name: str, undo: list) -> None:
        """Remove an adapter that ``_add`` created, and restore the base weights it rewrote."""
        with torch.no_grad():
            for weight, original in undo:
                weight.copy_(original)
        if adapter_name in self.adapters.names:
            self.adapters.delete(adapter_name)

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Make ``names`` the active adapter(s): the graph computes them, only they are trainable."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self.adapters.entry(name)  # raises for an unknown name
        saved_paths = [p for name in names for p in self.adapters.saved(name)]
        if len(saved_paths) != len(set(saved_paths)):
            raise AdapterError(f"Adapters {names} each keep a trained copy of the same module (modules_to_save); "
                               "only one of them can be active at a time (PEFT refuses this too).")
        if self._merge is not None and names != self.active_adapters:
            raise MergeError(f"Adapters {self._merge.adapters} are merged into the weights; unmerge() before "
                             "set_adapter.")
        if self._bank_current():  # routed graphs read the active adapter from the route: nothing to rebuild
            self.adapters.active = names
            self._freeze()
            return
        previous = self.active_adapters
        self.adapters.active = names
        try:
            self.refresh()
        except BaseException:
            self.adapters.active = previous
            raise
        self._freeze()

    def delete_adapter(self, adapter_name: str) -> None:
        if self._merge is not None and adapter_name in self._merge.adapters:
            raise MergeError(f"Adapter {adapter_name!r} is merged into the weights; unmerge() before deleting it.")
        entry, active = self.adapters.entry(adapter_name), self.active_adapters
        self.adapters.delete(adapter_name)
        try:
            self.refresh()
        except BaseException:
            self.adapters.add(adapter_name, entry)
            self.adapters.active = active
            raise
        self._freeze()

    def refresh(self) -> None:
        """Rebuild the graphs from the pristine captured ones and the adapter state."""
        self._restack()
        self._records = derive(self._captured, self._rewrite())
        self._version += 1

    def _rewrite(self) -> Rewrite:
        """The adapter state the graphs are derived from."""
        merged = self._merge.adapters if self._merge is not None else []
        live = [a for a in self.active_adapters if a not in merged]
        copies: dict[str, str] = {}
        for name in self.active_adapters:  # the first active adapter's copy of each saved module
            for path, (copy_path, _) in self.adapters.saved(name).items():
                copies.setdefault(path, f"{self._store_name}.{copy_path}")
        untied = self._merge.untied if self._merge is not None else {}
        return Rewrite(self.adapters, self._store_name, live, self.fuse, copies, untied)

    def _freeze(self) -> None:
        store = self.adapters
        adapter_params = {id(p) for p in store.parameters()}
        for p in self.graph_module.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)
        routed = store.names if store.bank is not None else store.active  # a bank trains each row's adapter
        trains = {name for name in routed if store.entry(name).trainable}
        for name, unit in store.iter_units():
            for p in unit.parameters():
                p.requires_grad_(name in trains)
        for name in store.names:
            for _, module in store.saved(name).values():
                module.requires_grad_(name in trains)
        for name in trains:
            for p in self.bias_parameters(name).values():
                p.requires_grad_(True)

    # ---- merging ------------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merge.adapters) if self._merge is not None else []

    def merge(self, adapter_names: str | Iterable[str] | None = None, *, safe: bool = False,
              keep_original: bool = True, progress: Callable[[str], None] | None = None) -> None:
        """Fold ``W += s·ΔW`` (float32, cast back once) for the adapters (default: the active ones) and erase
        their branches from the graph. ``safe``: check the merged weights are finite before committing.
        ``keep_original``: keep an exact copy of each W so ``unmerge`` restores it bit for bit."""
        if self._merge is not None:
            raise MergeError(f"Adapters {self._merge.adapters} are already merged; unmerge() before merging again.")
        if self.adapters.bank is not None:
            raise MergeError("Adapters are routed per row through an adapter bank; merging would fold them into "
                             "weights every row shares. remove_adapter_bank() first.")
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(dict.fromkeys(adapter_names)))
        if not names:
            raise MergeError("No adapter to merge: no adapter is active; pass adapter_names=[...].")
        units_by_key: dict[str, list] = {}
        for name in names:
            for key, unit in self.adapters.units(name).items():
                units_by_key.setdefault(key, []).append((name, unit))
        targets: dict[str, list[Target]] = {}
        for t in self.targets:
            targets.setdefault(t.key, []).append(t)
        self._merge = fold(self._captured, targets, units_by_key, names, safe=safe, keep_original=keep_original,
                           progress=progress)
        self.refresh()

    def unmerge(self) -> None:
        """Restore the base weights (and ties) and put the merged adapters' branches back in the graph."""
        if self._merge is None:
            raise MergeError("Nothing is merged; call merge() first.")
        unfold(self._captured, self._merge)
        self._merge = None
        self.refresh()

    def merge_and_unload(self, *, safe: bool = False) -> torch.fx.GraphModule:
        """Merge (if not merged yet) and return the graph module with folded weights and no LoRA nodes,
        parameters or store: a plain GraphModule to compile or export. This LoraModel is done afterwards."""
        if self._merge is None:
            self.merge(safe=safe, keep_original=False)
        return self._unload(keep_saved=True, keep_untied=True)

    def unload(self) -> torch.fx.GraphModule:
        """The base graph with no LoRA, weights as they were before any merge (as in PEFT, the active
        adapter's trained copies of ``modules_to_save`` replace the originals)."""
        if self._merge is not None:
            self.unmerge()
        return self._unload(keep_saved=True)

    def _unload(self, keep_saved: bool = False, keep_untied: bool = False) -> torch.fx.GraphModule:
        gm = self.graph_module
        if self.adapters.bank is not None:
            unbank(self.adapters)
            del self.adapters._modules[BANK]
        if keep_saved:  # the active adapter's trained copies of modules_to_save replace the originals
            for name in self.active_adapters:
                for path, (_, module) in self.adapters.saved(name).items():
                    with torch.no_grad():
                        for pname, p in module.named_parameters():
                            gm.get_parameter(f"{path}.{pname}").copy_(p)
                        for bname, b in module.named_buffers():
                            gm.get_buffer(f"{path}.{bname}").copy_(b)
        untied = self._merge.untied if keep_untied and self._merge is not None else {}
        derive(self._captured, Rewrite(self.adapters, self._store_name, [], self.fuse, {}, untied))
        for p in self.adapters.parameters():
            p.requires_grad_(False)
        delattr(gm, self._store_name)
        for block in self._captured.blocks.values():
            del block.lora_dropout
        if not untied and hasattr(gm, HOLDER):
            delattr(gm, HOLDER)
        self._merge = None
        self._programs.clear()  # other call signatures' graphs read the store: they go with it
        self._generation.clear()
        return gm

    def _discard(self) -> None:
        """Undo what creating this LoraModel did (a failed lorafy / from_peft): no store, the captured graph,
        the base parameters' ``requires_grad`` as they were."""
        self._unload()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def unit(self, key: str, adapter_name: str | None = None) -> LoraUnit:
        """The LoraUnit of ``key`` in ``adapter_name`` (default: the first active adapter)."""
        return self.adapters.unit(adapter_name or self.active_adapters[0], key)
