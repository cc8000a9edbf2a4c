"""fuse_loss: the model's own language-model loss computed from the hidden states without materialising the
logits (``ops.fused_loss``).

Recognised in the outer graph: a linear target (the output layer, with no branch or one plain LoRA branch) whose
output reaches a cross-entropy only through dtype and shape changes, as transformers' causal-LM loss computes it
(``logits.float()``, the shift done on the labels, ``view(-1, vocab)``, ``cross_entropy(ignore_index=-100)``, a sum
divided by ``num_items_in_batch`` when that is given)::

    logits = linear(h, W) (+ s·B A h) ─▶ float ─▶ view(-1, V) ─▶ cross_entropy(·, labels) ─▶ loss
                                                      becomes
    loss = linear_cross_entropy(h.reshape(-1, d), W, b, None | dropout(h), A, B, s, labels, -100, "mean")

The logits the model returns become None. Logits read by anything else keep the graph as it was.

Example::

    records = fuse_loss(graph, ctx)      # runs before insert_branches: it takes the output layer's branch over
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from ..kinds import LINEAR
from ..ops.fused_loss import linear_cross_entropy
from ..targets import arg, base_weight, compute_dtype
from .common import ident, new_node
from .pipeline import Action, GraphContext, Record, node_map
from .plan import UnitBranch

aten = torch.ops.aten
_SHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, "view", "reshape"}
_DTYPES = {aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.clone.default, "float", "to",
           "contiguous"}
_CHECKS = {aten._assert_tensor_metadata.default}  # shape/dtype asserts on a value: they go with it
_REDUCTIONS = {1: "mean", 2: "sum", "mean": "mean", "sum": "sum"}
_LINEAR_OPS = ("Linear", "F.linear", "aten.linear")


def fuse_loss(graph: fx.Graph, ctx: GraphContext) -> list[Record]:
    """Rewrite each recognised loss; the keys of the targets it takes over go to ``ctx.consumed``."""
    if not ctx.plan.fused_loss:
        return []
    nodes, records = node_map(graph), []
    by_node: dict[str, list] = {}
    for t in ctx.targets:
        by_node.setdefault(t.node, []).append(t)
    for loss in [n for n in graph.nodes if _cross_entropy(n) is not None]:
        logits, labels, ignore_index, reduction = _cross_entropy(loss)
        chain, base = _walk_back(logits)
        ts = by_node.get(base.name, []) if isinstance(base, fx.Node) else []
        t = next((x for x in ts if x.strategy is LINEAR), None)
        if t is None or t.op not in _LINEAR_OPS or t.key in ctx.consumed:
            continue
        if any(x is not t and ctx.branches(x) for x in ts):
            continue  # the head's weight also has a parameter target's adapter: left unfused
        branch = _branch(ctx, t)
        if branch is False or not _only_read_by(base, chain, loss):
            continue
        _rewrite(graph, t, nodes[t.node], loss, labels, ignore_index, reduction, chain, branch, ctx.inputs)
        ctx.consumed.add(t.key)
        records.append(Record("fuse_loss", Action.FUSED_LOSS, t.key, branch.adapter if branch else None))
    return records


def _cross_entropy(node: fx.Node):
    """``(logits, labels, ignore_index, reduction)`` of a plain cross-entropy node, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.cross_entropy_loss.default:
        weight, reduction = arg(node, 2, "weight"), arg(node, 3, "reduction", 1)
        ignore_index, smoothing = arg(node, 4, "ignore_index", -100), arg(node, 5, "label_smoothing", 0.0)
    elif node.target is F.cross_entropy:
        weight, reduction = arg(node, 2, "weight"), arg(node, 6, "reduction", "mean")
        ignore_index, smoothing = arg(node, 4, "ignore_index", -100), arg(node, 7, "label_smoothing", 0.0)
        if arg(node, 3, "size_average") is not None or arg(node, 5, "reduce") is not None:
            return None
    else:
        return None
    if weight is not None or smoothing or reduction not in _REDUCTIONS or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0], node.args[1], ignore_index, _REDUCTIONS[reduction]


def _walk_back(logits: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The dtype and row-flattening nodes between the logits the layer computes and the loss, and that layer."""
    chain, node = [], logits
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and (
            node.target in _DTYPES or node.target in _SHAPES) and node.args and isinstance(node.args[0], fx.Node):
        if node.target in _SHAPES and not _keeps_last_dim(node):
            break
        chain.append(node)
        node = node.args[0]
    return chain, node


def _keeps_last_dim(node: fx.Node) -> bool:
    """A view that only merges leading dimensions (so rows of the result are rows of ``h.reshape(-1, d)``)."""
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    if before is None or after is None:
        return False
    return after.dim() == 2 and after.shape[-1] == before.shape[-1]


def _branch(ctx: GraphContext, t) -> UnitBranch | None | bool:
    """The output layer's lone plain branch, None for no branch, False when the fused op cannot compute it."""
    found = ctx.branches(t)
    if not isinstance(found, tuple) or len(found) > 1:
        return False
    if not found:
        return None
    unit = found[0].unit
    if unit.variant.name != "lora" or unit.lora_A.dtype != compute_dtype(t, base_weight(ctx.root, t.weight)):
        return False
    return found[0]


def _only_read_by(base: fx.Node, chain: list[fx.Node], loss: fx.Node) -> bool:
    """Whether the logits (and each step towards the loss) are read only by that path, the output and asserts."""
    allowed = {*chain, loss}
    for node in (base, *chain):
        for user in node.users:
            if user not in allowed and user.op != "output" and user.target not in _CHECKS:
                return False
    return True


def _loss_dtype(chain: list[fx.Node], base: fx.Node) -> torch.dtype | None:
    """The dtype the logits reach the loss in: the last conversion's on the way (None: the layer's own)."""
    for node in chain:  # from the loss back
        if node.target == "float":
            return torch.float32
        if node.target in (aten.to.dtype, "to") and isinstance(node.args[-1], torch.dtype):
            return node.args[-1]
        if node.target is aten._to_copy.default and node.kwargs.get("dtype") is not None:
            return node.kwargs["dtype"]
    val = base.meta.get("val")
    return getattr(val, "dtype", None)


def _rewrite(graph, t, base, loss, labels, ignore_index, reduction, chain, branch, inputs) -> None:
    x = arg(base, *t.input_at)
    weight = t.weight if base.op == "call_module" else base.args[1]
    bias_ref = getattr(t.geometry, "bias", None)
    tag = {"key": t.key, "role": "loss"}
    stem = ident(t.key)
    with graph.inserting_before(loss):
        if base.op == "call_module":
            weight = new_node(graph, "get_attr", t.weight, (), f"{stem}_weight", tag)
            bias = new_node(graph, "get_attr", bias_ref.attr, (), f"{stem}_bias", tag) if bias_ref else None
        else:
            bias = arg(base, 2, "bias")
        h = new_node(graph, "call_method", "reshape", (x, -1, t.in_features), f"{stem}_rows", tag)
        hl = a = b = None
        scaling = 0.0
        if branch is not None:
            a, b = inputs.unit_tensor(branch, t, "lora_A"), inputs.unit_tensor(branch, t, "lora_B")
            scaling = float(branch.unit.scaling)
            if branch.unit.dropout_p > 0:
                hl = new_node(graph, "call_module", inputs.unit_dropout(branch, t), (h,), f"{stem}_lora_dropout",
                              tag)
        args = (h, weight, bias, hl, a, b, scaling, labels, ignore_index, reduction, _loss_dtype(chain, base))
        fused = new_node(graph, "call_function", linear_cross_entropy, args, f"{stem}_loss", tag)
    loss.replace_all_uses_with(fused)
    graph.erase_node(loss)
    for node in (*chain, base):
        for user in list(node.users):
            if user.op == "output":
                user.replace_input_with(node, None)  # the logits are not computed
            elif user.target in _CHECKS:
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
