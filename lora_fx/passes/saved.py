"""modules_to_save pass: point every graph use of a saved module at the active adapter's trainable copy.

PEFT's ``modules_to_save`` (a classifier head, say) trains a full copy of a module per adapter while the
original stays frozen. Here the copy lives in the adapter store and the pass re-targets the graph's reads of the
module: a ``call_module`` of it (or of anything below it) calls the copy; a ``get_attr`` of one of its tensors,
found by identity (torch.export names a tied weight once, under either owner), gives the copy's tensor to the
users inside the module (export's ``nn_module_stack``). Users outside it (a tied ``lm_head``) keep the original,
unless the adapter asked for ``ensure_weight_tying`` (``plan.saved_ties``): then they read the copy too, and a
``call_module`` of a tied ``nn.Linear`` becomes ``F.linear`` on the copy's weight. The pass runs on a fresh copy
of the captured graph at every rebuild, so nothing is ever undone.

Example::

    records = swap_saved(graph, ctx)      # ctx.plan.saved: {"classifier": "lora.default.saved.classifier"}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AdapterError
from .common import TAG
from .pipeline import Action, GraphContext, Record


def _inside(user: fx.Node, path: str) -> bool:
    """Whether ``user`` runs inside module ``path`` (export's nn_module_stack; fx graphs have none: yes)."""
    stack = user.meta.get("nn_module_stack")
    if not stack:
        return True
    inner = list(stack.values())[-1][0]
    return inner == path or inner.startswith(path + ".")


def _under(target: str, path: str) -> bool:
    return target == path or target.startswith(path + ".")


def swap_saved(g: fx.Graph, ctx: GraphContext) -> list[Record]:
    """Re-target reads of module path ``p`` to ``ctx.plan.saved[p]``; one record per node changed."""
    copies, records = ctx.plan.saved, []
    tied = set(ctx.plan.saved_ties.values())
    tensors = _tensors(ctx.root, copies)
    for node in list(g.nodes):
        if node.op not in ("call_module", "get_attr") or TAG in node.meta:
            continue
        if node.op == "call_module":
            path = next((p for p in copies if _under(node.target, p)), None)
            if path is not None:
                _retarget(node, copies[path] + node.target[len(path):])
            elif (path := _tied_module(ctx.root, node, tensors, tied)) is not None:
                _linear_on_copy(g, ctx.root, node, tensors[id(ctx.root.get_submodule(node.target).weight)][1])
            if path is not None:
                records.append(Record("swap_saved", Action.SAVED, path))
            continue
        found = tensors.get(id(_tensor(ctx.root, node.target)))
        if found is None:
            continue
        path, copy_target = found
        users = list(node.users)
        if path in tied or all(_inside(u, path) for u in users):
            _retarget(node, copy_target)
        else:
            with g.inserting_after(node):
                copy = g.get_attr(copy_target)
            copy.meta[TAG] = {"role": "saved_copy", "of": node.name}
            for u in users:
                if _inside(u, path):
                    u.replace_input_with(node, copy)
        records.append(Record("swap_saved", Action.SAVED, path))
    return records


def _tensors(root: nn.Module, copies: dict[str, str]) -> dict[int, tuple[str, str]]:
    """id of each tensor of a saved module -> (its path, the copy's tensor path)."""
    out: dict[int, tuple[str, str]] = {}
    for path, copy in copies.items():
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            out.setdefault(id(t), (path, f"{copy}.{name}"))
    return out


def _tensor(root: nn.Module, target: str) -> torch.Tensor | None:
    try:
        return root.get_parameter(target)
    except AttributeError:
        try:
            return root.get_buffer(target)
        except AttributeError:
            return None


def _retarget(node: fx.Node, target: str) -> None:
    node.meta[TAG] = {"role": "saved", "target": node.target}
    node.target = target


def _tied_module(root: nn.Module, node: fx.Node, tensors: dict, tied: set[str]) -> str | None:
    """The tied saved path whose weight a called module (not below it) reads, under ensure_weight_tying."""
    weight = getattr(root.get_submodule(node.target), "weight", None)
    found = tensors.get(id(weight)) if weight is not None else None
    return found[0] if found is not None and found[0] in tied else None


def _linear_on_copy(g: fx.Graph, root: nn.Module, node: fx.Node, weight: str) -> None:
    module = root.get_submodule(node.target)
    if not isinstance(module, nn.Linear):
        raise AdapterError(f"ensure_weight_tying: {node.target!r} ({type(module).__name__}) reads a saved module's "
                           "weight through its own forward; only nn.Linear calls can read the trained copy.")
    with g.inserting_before(node):
        w = g.get_attr(weight)
        bias = g.get_attr(f"{node.target}.bias") if module.bias is not None else None
        new = g.call_function(F.linear, (node.args[0], w, bias))
    new.meta[TAG] = {"role": "saved", "target": node.target}
    node.replace_all_uses_with(new)
    g.erase_node(node)
