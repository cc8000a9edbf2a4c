"""The rewrite report: one row per targeted key, rendered with tabulate.

Example::

    print(lm.report())
    # key                              kind    node    op      in  out  r  alpha  scaling  params  action
    # model.layers.0.self_attn.q_proj  linear  linear  aten.linear  64  64  8  16  2  1024  lora
    # 14 targets, 14,336 LoRA parameters added; trainable: 14,336 of 1,042,880 (1.3746%)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from .passes.pipeline import Action

COLUMNS = ("key", "kind", "node", "op", "in", "out", "r", "alpha", "scaling", "params", "action")


@dataclass
class RewriteReport:
    rows: list[dict]
    trainable: int
    total: int
    unused_rules: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)

    @property
    def added_parameters(self) -> int:
        return sum(r["params"] for r in self.rows)

    def summary(self) -> str:
        pct = 100 * self.trainable / self.total if self.total else 0.0
        keys = len({r["key"].partition("[")[0] for r in self.rows})
        return (
            f"{keys} targets, {self.added_parameters:,} LoRA parameters added; "
            f"trainable: {self.trainable:,} of {self.total:,} ({pct:.4f}%)"
        )

    def __str__(self) -> str:
        columns = COLUMNS if len({r.get("adapter") for r in self.rows}) <= 1 else ("adapter", *COLUMNS)
        table = tabulate([[r.get(c, "") for c in columns] for r in self.rows], headers=columns)
        lines = [table, self.summary()]
        if self.passes:
            lines += ["passes:"] + [f"  - {p}" for p in self.passes]
        if self.unused_rules:
            lines.append("rules that matched nothing: " + ", ".join(self.unused_rules))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RewriteReport({len(self.rows)} rows; {self.summary()})"


def passes_summary(records: list, derived: list = ()) -> list[str]:
    """One line per optimisation the derivation applied, read from the passes' typed records (``derived``: the
    records of other captures, for what only they do: the fused loss of calls with labels)."""
    fused = [r for r in records if r.action is Action.FUSED]
    groups = {r.group for r in fused}
    siblings = sum(1 for g in groups if sum(r.group == g for r in fused) > 1)
    lines = []
    if fused:
        owning = len({r.group for r in fused if r.owns_base})
        lines.append(f"fuse_siblings: {len(fused)} branches as {len(groups)} fused ops ({siblings} sibling groups "
                     f"sharing one A-matmul; {owning} own their base linears; scale folded into an in-place addmm)")
    losses = [r.key for r in (*records, *derived) if r.action is Action.FUSED_LOSS]
    if losses:
        lines.append(f"fuse_loss: the loss after {', '.join(sorted(set(losses)))} computed from the hidden states in "
                     "chunks of tokens (no logits materialised; the output's logits are None)")
    inserted = [r for r in records if r.action in (Action.BRANCH, Action.ROUTED)]
    no_dropout = sum(not r.dropout for r in inserted)
    if no_dropout:
        lines.append(f"drop_dropout: no dropout node on {no_dropout} branches (p = 0)")
    return lines
