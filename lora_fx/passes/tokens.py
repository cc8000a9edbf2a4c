"""Trainable tokens pass: every read of a weight with trainable tokens reads ``W.index_copy(0, indices, delta)``.

``ctx.plan.tokens`` maps a module path to the active adapters' ``TokenDelta`` paths (``adapters.tokens``). The
pass finds the graph's reads of that module's weight by identity, so a tied output layer (GPT-2's ``lm_head``
reading the embedding's weight) follows the embedding as PEFT's tied token adapter does: ``get_attr`` reads get
the replaced rows after them; a ``call_module`` of an Embedding or Linear holding the weight becomes its
functional form on the new weight. Runs on a fresh copy of the captured graph at every rebuild.

Example::

    records = swap_tokens(graph, ctx)    # ctx.plan.tokens: {"model.embed_tokens": ("lora.default.tokens.x",)}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AdapterError
from .common import TAG
from .pipeline import Action, GraphContext, Record


def swap_tokens(g: fx.Graph, ctx: GraphContext) -> list[Record]:
    records = []
    for path, deltas in ctx.plan.tokens.items():
        try:
            weight = ctx.root.get_parameter(f"{path}.weight")
        except AttributeError:
            continue  # not in this capture (a backbone's graph without the head)
        for node in list(g.nodes):
            if node.meta.get(TAG, {}).get("role") == "tokens" or not _reads(ctx.root, node, weight):
                continue
            if node.op == "get_attr":
                _after_get_attr(g, node, deltas)
            else:
                _functional(g, ctx.root, node, deltas)
            records.append(Record("swap_tokens", Action.TOKENS, path))
    return records


def _reads(root: nn.Module, node: fx.Node, weight: nn.Parameter) -> bool:
    try:
        if node.op == "get_attr":
            return root.get_parameter(node.target) is weight
        if node.op == "call_module":
            return getattr(root.get_submodule(node.target), "weight", None) is weight
    except AttributeError:
        return False
    return False


def _replaced(g: fx.Graph, w: fx.Node, deltas: tuple[str, ...]) -> fx.Node:
    """``w`` with each adapter's rows written in, in order (nodes inserted at the current insertion point)."""
    for path in deltas:
        idx, delta = g.get_attr(f"{path}.indices"), g.get_attr(f"{path}.delta")
        w = g.call_function(torch.index_copy, (w, 0, idx, delta))
        for n in (idx, delta, w):
            n.meta[TAG] = {"role": "tokens", "of": path}
    return w


def _after_get_attr(g: fx.Graph, node: fx.Node, deltas: tuple[str, ...]) -> None:
    users = list(node.users)
    with g.inserting_before(node.next):  # after ``node``, in creation order
        new = _replaced(g, node, deltas)
    for u in users:
        u.replace_input_with(node, new)


def _functional(g: fx.Graph, root: nn.Module, node: fx.Node, deltas: tuple[str, ...]) -> None:
    module = root.get_submodule(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    with g.inserting_before(node):
        w = _replaced(g, g.get_attr(f"{node.target}.weight"), deltas)
        if isinstance(module, nn.Embedding):
            new = g.call_function(F.embedding, (x, w, module.padding_idx, module.max_norm, module.norm_type,
                                                module.scale_grad_by_freq, module.sparse))
        elif isinstance(module, nn.Linear):
            bias = g.get_attr(f"{node.target}.bias") if module.bias is not None else None
            new = g.call_function(F.linear, (x, w, bias))
        else:
            raise AdapterError(f"trainable tokens on {node.target!r}: its {type(module).__name__} is called as a "
                               "module; only nn.Embedding and nn.Linear calls can read replaced rows.")
    new.meta[TAG] = {"role": "tokens", "of": node.target}
    node.replace_all_uses_with(new)
    g.erase_node(node)
