"""The pass contract: every pass is ``pass_(graph, ctx) -> list[Record]`` on a fresh copy of a captured graph, and
a pipeline is a list of passes run in order.

``run_pipeline`` runs them, lints the graph after each when ``ctx.debug`` (or ``LORA_FX_DEBUG=1``), and names the
pass and the graph when one fails. Records are typed: an ``Action`` and the key, adapter and group it concerns,
which the report reads as fields.

Example::

    records = run_pipeline(graph, (untie_merged, insert_branches, fuse_siblings, swap_saved), ctx, "outer graph")
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..errors import LoraFxError, PassError
from .plan import RewritePlan


class Action(enum.Enum):
    BRANCH = "branch"  # a branch inserted after its target (plain LoRA or a variant's)
    ROUTED = "routed"  # one routed branch over the adapter bank's slots
    FUSED = "fused"  # a branch computed by a fused sibling op
    UNTIED = "untied"  # a merged key reads its own copy of a shared weight
    SAVED = "saved"  # a module's uses re-targeted to its modules_to_save copy
    TOKENS = "tokens"  # a read of a weight given the trainable tokens' rows
    WIRED = "wired"  # a block call given the adapter tensors its program reads
    FUSED_LOSS = "fused_loss"  # an output layer and its cross-entropy computed without the logits


@dataclass(frozen=True)
class Record:
    pass_name: str
    action: Action
    key: str
    adapter: str | None = None
    group: str | None = None  # the fused op's node (fuse) or the block path's group
    dropout: bool = False  # the branch has a dropout node (p > 0)
    owns_base: bool = False  # the fused op computes the base linears too


@dataclass
class GraphContext:
    """What the passes need besides the graph: its targets (keys relative to the graph), the plan (looked up by
    full key: ``prefix`` + key), where adapter tensors come from (``inputs``), the module that resolves the graph's
    own attributes (``root``), and, for the outer graph, the block calls to wire (``block_inputs``)."""

    targets: list[Any]
    plan: RewritePlan
    inputs: Any  # StoreInputs | BlockInputs
    root: nn.Module
    prefix: str = ""  # the full key of a target is prefix + target.key (a block member's path)
    block_inputs: dict[str, list] = field(default_factory=dict)  # block path -> its program's input order
    key_prefix: str = ""  # the capture's key prefix (a backbone captured under its model's keys)
    debug: bool = False
    consumed: set[str] = field(default_factory=set)  # target keys a pass took over (later passes skip them)

    def branches(self, t: Any) -> Any:
        return self.plan.for_key(self.prefix + t.key)


Pass = Callable[[fx.Graph, GraphContext], list]


def run_pipeline(graph: fx.Graph, passes: Sequence[Pass], ctx: GraphContext, label: str) -> list[Record]:
    """Run ``passes`` on ``graph`` in order; returns their records."""
    debug = ctx.debug or os.environ.get("LORA_FX_DEBUG") == "1"
    records: list[Record] = []
    for p in passes:
        try:
            records += p(graph, ctx)
            if debug:
                graph.lint()
        except LoraFxError:
            raise
        except Exception as e:
            raise PassError(f"graph pass {p.__name__} failed on the {label} ({type(e).__name__}: {e}). This is a "
                            "lora_fx bug: please report it with the model and rules.") from e
    return records


def node_map(graph: fx.Graph) -> dict[str, fx.Node]:
    return {n.name: n for n in graph.nodes}
