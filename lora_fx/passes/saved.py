"""modules_to_save pass: point every graph use of a saved module at the active adapter's trainable copy.

PEFT's ``modules_to_save`` (a classifier head, say) trains a full copy of a module per adapter while the
original stays frozen. Here the copy lives in the adapter store and the pass re-targets the graph's
``call_module`` / ``get_attr`` nodes that read the module (or anything below it) to the copy. A ``get_attr``
also read from outside the module (a tied weight: GPT-2's ``lm_head.weight`` is the embedding's too) keeps
its other users: those inside the module get a new ``get_attr`` of the copy. The pass runs on a fresh copy of
the captured graph at every rebuild, so nothing is ever undone.

Example::

    records = swap_saved(graph, ctx)      # ctx.plan.saved: {"classifier": "lora.default.saved.classifier"}
"""

from __future__ import annotations

from torch import fx

from .common import TAG
from .pipeline import Action, GraphContext, Record


def _inside(user: fx.Node, path: str) -> bool:
    """Whether ``user`` runs inside module ``path`` (export's nn_module_stack; fx graphs have none: yes)."""
    stack = user.meta.get("nn_module_stack")
    if not stack:
        return True
    inner = list(stack.values())[-1][0]
    return inner == path or inner.startswith(path + ".")


def swap_saved(g: fx.Graph, ctx: GraphContext) -> list[Record]:
    """Re-target uses of module path ``p`` (or below it) to ``ctx.plan.saved[p]``; one record per node changed."""
    copies, records = ctx.plan.saved, []
    for node in list(g.nodes):
        if node.op not in ("call_module", "get_attr") or TAG in node.meta:
            continue
        path = next((p for p in copies if node.target == p or node.target.startswith(p + ".")), None)
        if path is None:
            continue
        new_target = copies[path] + node.target[len(path):]
        users = list(node.users)
        if node.op == "get_attr" and not all(_inside(u, path) for u in users):
            with g.inserting_after(node):
                copy = g.get_attr(new_target)
            copy.meta[TAG] = {"role": "saved_copy", "of": node.name}
            for u in users:
                if _inside(u, path):
                    u.replace_input_with(node, copy)
        else:
            node.meta[TAG] = {"role": "saved", "target": node.target}
            node.target = new_target
        records.append(Record("swap_saved", Action.SAVED, path))
    return records
