"""Introspection verbs of LoraModel: trainable parameters (PEFT's counts) and the rewrite report.

Example::

    lm.print_trainable_parameters()   # trainable params: 3,584 || all params: 90,432 || trainable%: 3.9632
    print(lm.report())
"""

from __future__ import annotations

from torch import nn

from .report import RewriteReport, passes_summary


class ReportMixin:
    """trainable_parameters / report for LoraModel (which provides adapters, targets, records and merge state)."""

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
        by_key: dict[str, list] = {}
        for t in self.targets:
            by_key.setdefault(t.key, []).append(t)
        merged = self.merged_adapters
        untied = {f.key for f in self._merge.folds if f.untied is not None} if self._merge is not None else set()
        rows = []
        for name, unit in self.adapters.iter_units():
            ts = by_key[unit.key]
            t = ts[0]
            action = ("merged" if name in merged else "routed" if self.adapters.bank is not None
                      else "lora" if name in self.adapters.active else "inactive")
            suffix = (" (untied copy)" if name in merged and unit.key in untied
                      else " (shared weight)" if t.shared else "")
            row = {
                "adapter": name, "key": unit.key, "kind": unit.kind, "node": ",".join(x.node for x in ts),
                "op": t.op, "in": t.in_features, "out": t.out_features, "r": unit.r, "alpha": unit.alpha,
                "scaling": round(unit.scaling, 6), "dropout": unit.dropout_p, "block": t.block or None,
                "params": sum(p.numel() for p in unit.parameters()), "action": action + suffix,
            }
            if not unit.slices:
                rows.append(row)
                continue
            for start, stop in unit.slices:  # one row per output slice, with its own A and B
                rows.append({**row, "key": f"{unit.key}[{start}:{stop}]", "out": stop - start,
                             "params": unit.r * (t.in_features + stop - start)})
        trainable, total = self.get_nb_trainable_parameters()
        unused = [f"{r} [{a}]" for a in self.adapters.names for r in self.adapters.entry(a).unused_rules]
        passes = passes_summary(self._records)
        blocks = self._captured.blocks
        if blocks:
            programs = len({id(b.program) for b in blocks.values()})
            passes.insert(0, f"blocks: {len(blocks)} repeated blocks kept as submodules, "
                             f"{len(self._captured.templates)} traced template(s), {programs} rewritten program(s)")
        can_generate = getattr(self._captured.source, "can_generate", None)
        if callable(can_generate) and can_generate() and len(self.merged_adapters) < len(self.active_adapters):
            passes.append("generate: the original model's own generate() does not see unmerged adapters; use "
                          "lm.generate(...), or merge() first")
        bank = self.adapters.bank
        if bank is not None:
            passes.append(f"adapter bank: {len(bank.slots)} slots {bank.slots} + '__base__', max rank "
                          f"{bank.max_rank}, {len(bank.stems)} targets; rows routed by adapter_names (default: the "
                          "active adapter)")
        for name in self.adapters.names:
            errors = self.adapters.entry(name).svd_error
            if errors:
                worst = max(errors, key=errors.get)
                passes.append(f"weighted adapter {name!r}: SVD relative reconstruction error max "
                              f"{errors[worst]:.3g} ({worst}), mean {sum(errors.values()) / len(errors):.3g}")
            for path, (_, module) in self.adapters.saved(name).items():
                n = sum(p.numel() for p in module.parameters())
                passes.append(f"modules_to_save: {path} -> trainable copy in adapter {name!r} ({n:,} parameters)")
            bias = self.adapters.entry(name).bias
            if bias != "none":
                passes.append(f"bias={bias!r}: {len(self.bias_parameters(name))} base biases trainable "
                              f"in adapter {name!r}")
        return RewriteReport(rows, trainable, total, unused, passes)
