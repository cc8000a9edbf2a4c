"""Introspection verbs of LoraModel: trainable parameters (PEFT's counts) and the rewrite report.

Example::

    lm.print_trainable_parameters()   # trainable params: 3,584 || all params: 90,432 || trainable%: 3.9632
    print(lm.report())
"""

from __future__ import annotations

import torch
from torch import nn

from ..report import RewriteReport, passes_summary


class ReportMixin:
    """trainable_parameters / report for LoraModel (which provides the state and the derivation records)."""

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

    def variant_loss(self, adapter_names: str | list[str] | None = None,
                     variant: str | None = None) -> torch.Tensor | float:
        """The auxiliary losses the active (or named) adapters' variants train with, each variant's terms summed or
        averaged over its units as PEFT does (KaSA: the sum of ``beta·‖d‖² + gamma·(‖BᵀB - I‖ + ‖AAᵀ - I‖)``;
        MonteCLoRA: the mean of its KL terms); ``variant`` keeps one (its label, ``"KaSA"``). 0.0 when none has
        one. Add it to the task loss::

            loss = out.loss + lm.variant_loss()
        """
        state = self.state
        names = state.active if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) \
            else adapter_names
        terms: dict[str, list] = {}
        for name in names:
            for unit in state.entries[name].by_key.values():
                term = unit.variant.regularization(unit)
                if term is not None and variant in (None, unit.variant.label):
                    terms.setdefault(unit.variant.loss_reduction, []).append(term)
        total: torch.Tensor | float = sum(terms.get("sum", []), 0.0)
        mean = terms.get("mean", [])
        return total + sum(mean, 0.0) / len(mean) if mean else total

    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """PEFT's KaSA regularizer (``variant_loss`` of KaSA units)."""
        return self.variant_loss(adapter_names, "KaSA")

    def _get_monteclora_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """PEFT's MonteCLoRA variational loss (``variant_loss`` of MonteCLoRA units)."""
        return self.variant_loss(adapter_names, "MonteCLoRA")

    def report(self) -> RewriteReport:
        """What the rewrite did: one row per (adapter, key) (per output slice for sliced units)."""
        state = self.state
        by_key: dict[str, list] = {}
        for t in self.targets:
            by_key.setdefault(t.key, []).append(t)
        merged = state.merged
        untied = set(state.merge.untied) if state.merge is not None else set()
        rows = []
        for name, unit in state.iter_units():
            ts = by_key[unit.key]
            t = ts[0]
            action = ("merged" if name in merged else "inert (the forward never calls it)" if t.inert
                      else "routed" if state.bank is not None else "lora" if name in state.active else "inactive")
            copy = name in merged and unit.key in untied
            suffix = " (untied copy)" if copy else " (shared weight)" if t.shared else ""
            row = {
                "adapter": name, "key": unit.key, "kind": unit.kind, "node": ",".join(x.node for x in ts),
                "op": t.op, "in": t.in_features, "out": t.out_features, "r": unit.r, "alpha": unit.alpha,
                "scaling": round(unit.scaling, 6), "dropout": unit.dropout_p, "block": t.block or None,
                "params": sum(p.numel() for p in unit.parameters()), "action": action + suffix, "untied": copy,
                "variant": unit.variant.name,
            }
            rows += unit.variant.report_rows(unit, row)
        trainable, total = self.get_nb_trainable_parameters()
        unused = [f"{r} [{a}]" for a in state.names for r in state.entries[a].unused_rules]
        passes = passes_summary(self._records, [r for e in self._graphs.entries() for r in e.records])
        blocks = state.captured.blocks
        if blocks:
            programs = len({id(b.program) for b in blocks.values()})
            passes.insert(0, f"blocks: {len(blocks)} repeated blocks kept as submodules, "
                             f"{len(state.captured.templates)} traced template(s), {programs} rewritten program(s)")
        can_generate = getattr(state.captured.source, "can_generate", None)
        if callable(can_generate) and can_generate() and len(merged) < len(state.active):
            passes.append("generate: the original model's own generate() does not see unmerged adapters; use "
                          "lm.generate(...), or merge() first")
        bank = state.bank
        if bank is not None:
            passes.append(f"adapter bank: {len(bank.slots)} slots {bank.slots} + '__base__', max rank "
                          f"{bank.max_rank}, {len(bank.stems)} targets; rows routed by adapter_names (default: the "
                          "active adapter)")
        for name, entry in state.entries.items():
            errors = entry.svd_error
            if errors:
                worst = max(errors, key=errors.get)
                passes.append(f"weighted adapter {name!r}: SVD relative reconstruction error max "
                              f"{errors[worst]:.3g} ({worst}), mean {sum(errors.values()) / len(errors):.3g}")
            for path, (_, module) in entry.saved_copies().items():
                n = sum(p.numel() for p in module.parameters())
                passes.append(f"modules_to_save: {path} -> trainable copy in adapter {name!r} ({n:,} parameters)")
            for head, emb in entry.ties.items():
                passes.append(f"ensure_weight_tying: {head} reads {emb}'s adapter {name!r} (one weight, one update)")
            for path, (_, tokens) in entry.token_deltas().items():
                passes.append(f"trainable tokens: rows {tokens.indices.tolist()} of {path} in adapter {name!r} "
                              f"({tokens.delta.numel():,} parameters; every read of its weight, a tied head's too)")
            if entry.bias != "none":
                passes.append(f"bias={entry.bias!r}: {len(self.bias_parameters(name))} base biases trainable "
                              f"in adapter {name!r}")
        return RewriteReport(rows, trainable, total, unused, passes)
