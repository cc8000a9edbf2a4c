"""LoraModel: the rewritten graph module, its adapter store and the verbs that act on them.

Example::

    lm = lorafy(model, ["q_proj", "v_proj"])
    lm.print_trainable_parameters()
    loss = lm(x).sum(); loss.backward()       # only lm.adapters' parameters get gradients
    print(lm.report())
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .capture import Captured
from .errors import AdapterError, MergeError
from .init_schemes import is_weight_init, svd_init
from .matching import match_targets
from .model_io import CheckpointMixin
from .passes import insert_lora, remove_lora
from .passes.fold import Folded, fold_weights, unfold_weights
from .passes.insert import adapter_dtype
from .passes.saved import restore_saved, swap_saved
from .report import RewriteReport, passes_summary
from .rules import RuleLike, as_ruleset, resolve_for_model
from .store import AdapterStore, LoraUnit, check_adapter_name, unit_shapes
from .targets import Target, find_targets


class LoraModel(CheckpointMixin, nn.Module):
    """A captured model with LoRA branches as graph rewrites. Call it as you would call the model."""

    def __init__(self, captured: Captured, *, fuse: bool = True) -> None:
        super().__init__()
        self.fuse = fuse  # run eligible linear branches through the sibling-fusion pass
        self.graph_module = captured.graph_module
        self._captured = captured
        self._found = find_targets(captured.graph_module, captured.source)
        self.targets: list[Target] = []
        self._unused_rules: dict[str, list[str]] = {}
        self._store_name = "lora" if not hasattr(self.graph_module, "lora") else "lora_fx_store"
        self.graph_module.add_module(self._store_name, AdapterStore())
        self._merged: list[str] = []
        self._folded: list[Folded] = []
        self._records: list[dict] = []
        self._bias: dict[str, str] = {}  # adapter -> PEFT's bias mode
        self._residual_backup: list = []  # (weight, W before PiSSA/OLoRA) of the last add_adapter
        self._ready = True

    # ---- calling -------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

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
        if getattr(self, "_ready", False):
            self.refresh()  # dtype casts in the graph follow the new dtypes
        return out

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, rules: RuleLike, *, autocast_adapter_dtype: bool = True) -> None:
        """Create adapter ``adapter_name`` for the keys ``rules`` select. As in PEFT, it becomes active only
        when no adapter is active yet (use ``set_adapter``). Nothing changes if the rules are invalid or
        match nothing."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters.names:
            raise AdapterError(f"Adapter {adapter_name!r} already exists; choose another name.")
        ruleset, saved = resolve_for_model(as_ruleset(rules), self._captured.source)
        matched = match_targets(self._found, ruleset, type(self._captured.source).__name__)
        units, seen, residuals = [], set(), []
        for t in matched.targets:
            if t.key in seen:
                continue
            seen.add(t.key)
            rule = matched.rules_by_key[t.key]
            weight = self.graph_module.get_parameter(t.weight_path)
            shape_a, shape_b = unit_shapes(t.kind, t.in_features, t.out_features, rule.r, t.extra)
            unit = LoraUnit(t.key, t.kind, shape_a, shape_b, rule, extra=t.extra, device=weight.device,
                            dtype=adapter_dtype(weight.dtype, autocast_adapter_dtype))
            if rule.use_dora:
                if unit.lora_A.dtype != weight.dtype:
                    raise AdapterError(f"DoRA on {t.key!r} needs adapters in the base weight's dtype ({weight.dtype});"
                                       " pass autocast_adapter_dtype=False.")
                unit.init_magnitude(weight, t.layout)
            if is_weight_init(rule.init):  # PiSSA / OLoRA: A, B from W; the base keeps W - s·B A
                if self._merged:
                    raise MergeError(f"init={rule.init!r} rewrites base weights; unmerge() {self._merged} first.")
                residuals.append((weight, svd_init(unit, weight, t.layout)))
            units.append(unit)
        self.adapters.add(adapter_name, units, {p: copy.deepcopy(m).requires_grad_(True) for p, m in saved.items()})
        self._residual_backup = [(w, w.detach().clone()) for w, _ in residuals]  # for load_adapter's undo
        with torch.no_grad():
            for weight, residual in residuals:
                weight.copy_(residual)
        self._bias[adapter_name] = ruleset.bias
        self._unused_rules[adapter_name] = matched.unused_rules
        known = {id(t.node) for t in self.targets}
        self.targets += [t for t in matched.targets if id(t.node) not in known]
        self.set_adapter(self.active_adapters or adapter_name)

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Make ``names`` the active adapter(s): the graph computes them, only they are trainable."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self.adapters.units(name)  # raises for an unknown name
        saved_paths = [p for name in names for p in self.adapters.saved(name)]
        if len(saved_paths) != len(set(saved_paths)):
            raise AdapterError(f"Adapters {names} each keep a trained copy of the same module (modules_to_save); "
                               "only one of them can be active at a time (PEFT refuses this too).")
        if self._merged and names != self.active_adapters:
            raise MergeError(f"Adapters {self._merged} are merged into the weights; unmerge() before set_adapter.")
        self.adapters.active = names
        self._freeze()
        self.refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self._merged:
            raise MergeError(f"Adapter {adapter_name!r} is merged into the weights; unmerge() before deleting it.")
        remove_lora(self.graph_module)  # the graph must stop reading the adapter before it goes
        restore_saved(self.graph_module)
        self.adapters.delete(adapter_name)
        self._bias.pop(adapter_name, None)
        self._freeze()
        self._unused_rules.pop(adapter_name, None)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the LoRA branches from the store (after a change of adapters, dtypes or scales)."""
        remove_lora(self.graph_module)
        restore_saved(self.graph_module)
        live = [a for a in self.active_adapters if a not in self._merged]
        try:
            self._records = insert_lora(self.graph_module, self.adapters, self.targets, live, self._store_name,
                                        fuse=self.fuse)
            copies: dict[str, str] = {}
            for name in self.active_adapters:  # the first active adapter's copy of each saved module
                for path, (copy_path, _) in self.adapters.saved(name).items():
                    copies.setdefault(path, f"{self._store_name}.{copy_path}")
            swap_saved(self.graph_module, copies)
        except Exception:
            remove_lora(self.graph_module)
            restore_saved(self.graph_module)
            raise

    def _freeze(self) -> None:
        store = self.adapters
        adapter_params = {id(p) for p in store.parameters()}
        for p in self.graph_module.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)
        for name, unit in store.iter_units():
            for p in unit.parameters():
                p.requires_grad_(name in store.active)
        for name in store.names:
            for _, module in store.saved(name).values():
                module.requires_grad_(name in store.active)
        for name in store.active:
            for p in self.bias_parameters(name).values():
                p.requires_grad_(True)

    # ---- merging ------------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge(self, adapter_names: str | Iterable[str] | None = None, *, safe: bool = False,
              keep_original: bool = True, progress: Callable[[str], None] | None = None) -> None:
        """Fold ``W += s·ΔW`` (float32, cast back once) for the adapters (default: the active ones) and erase
        their branches from the graph. ``safe``: check the merged weights are finite before committing.
        ``keep_original``: keep an exact copy of each W so ``unmerge`` restores it bit for bit."""
        if self._merged:
            raise MergeError(f"Adapters {self._merged} are already merged; unmerge() before merging again.")
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(dict.fromkeys(adapter_names)))
        if not names:
            raise MergeError("No adapter to merge: no adapter is active; pass adapter_names=[...].")
        units_by_key: dict[str, list] = {}
        for name in names:
            for key, unit in self.adapters.units(name).items():
                units_by_key.setdefault(key, []).append((name, unit))
        self._folded = fold_weights(self.graph_module, self._captured.source, self.targets, units_by_key,
                                    safe=safe, keep_original=keep_original, progress=progress)
        self._merged = names
        self.refresh()

    def unmerge(self) -> None:
        """Restore the base weights (and ties) and put the merged adapters' branches back in the graph."""
        if not self._merged:
            raise MergeError("Nothing is merged; call merge() first.")
        unfold_weights(self.graph_module, self._folded)
        self._merged, self._folded = [], []
        self.refresh()

    def merge_and_unload(self, *, safe: bool = False) -> torch.fx.GraphModule:
        """Merge (if not merged yet) and return the graph module with folded weights and no LoRA nodes,
        parameters or store: a plain GraphModule to compile or export. This LoraModel is done afterwards."""
        if not self._merged:
            self.merge(safe=safe, keep_original=False)
        self._folded = []
        return self._unload(keep_saved=True)

    def unload(self) -> torch.fx.GraphModule:
        """The base graph with no LoRA, weights as they were before any merge (as in PEFT, the active
        adapter's trained copies of ``modules_to_save`` replace the originals)."""
        if self._merged:
            self.unmerge()
        return self._unload(keep_saved=True)

    def _unload(self, keep_saved: bool = False) -> torch.fx.GraphModule:
        gm = self.graph_module
        if keep_saved:  # the active adapter's trained copies of modules_to_save replace the originals
            for name in self.active_adapters:
                for path, (_, module) in self.adapters.saved(name).items():
                    with torch.no_grad():
                        for pname, p in module.named_parameters():
                            gm.get_parameter(f"{path}.{pname}").copy_(p)
                        for bname, b in module.named_buffers():
                            gm.get_buffer(f"{path}.{bname}").copy_(b)
        remove_lora(gm)
        restore_saved(gm)
        for p in self.adapters.parameters():
            p.requires_grad_(False)
        delattr(gm, self._store_name)
        self._merged, self._folded = [], []
        gm.recompile()
        return gm

    # ---- introspection -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require grad (exactly the active adapters'): pass them to an optimiser."""
        return [p for p in self.parameters() if p.requires_grad]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT computes them."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def report(self) -> RewriteReport:
        """What the rewrite did: one row per (adapter, key)."""
        rows = []
        for name, unit in self.adapters.iter_units():
            nodes = [t for t in self.targets if t.key == unit.key]
            t = nodes[0]
            action = "merged" if name in self._merged else "lora" if name in self.adapters.active else "inactive"
            untied = name in self._merged and any(f.key == unit.key and f.untied is not None for f in self._folded)
            rows.append({
                "adapter": name, "key": unit.key, "kind": unit.kind, "node": ",".join(n.node.name for n in nodes),
                "op": t.op, "in": t.in_features, "out": t.out_features, "r": unit.r, "alpha": unit.alpha,
                "scaling": round(unit.scaling, 6), "dropout": unit.dropout_p,
                "params": sum(p.numel() for p in unit.parameters()),
                "action": action + (" (untied copy)" if untied else " (shared weight)" if t.shared else ""),
            })
        trainable, total = self.get_nb_trainable_parameters()
        unused = [f"{r} [{a}]" for a, rs in self._unused_rules.items() for r in rs]
        passes = passes_summary(self._records)
        for name in self.adapters.names:
            for path, (_, module) in self.adapters.saved(name).items():
                n = sum(p.numel() for p in module.parameters())
                passes.append(f"modules_to_save: {path} -> trainable copy in adapter {name!r} ({n:,} parameters)")
            if self._bias.get(name, "none") != "none":
                passes.append(f"bias={self._bias[name]!r}: {len(self.bias_parameters(name))} base biases trainable "
                              f"in adapter {name!r}")
        return RewriteReport(rows, trainable, total, unused, passes)

    def unit(self, key: str, adapter_name: str | None = None) -> LoraUnit:
        """The LoraUnit of ``key`` in ``adapter_name`` (default: the first active adapter)."""
        return self.adapters.unit(adapter_name or self.active_adapters[0], key)
