"""Plain LoRA branches (and DoRA) after a target node, one per active adapter, in PEFT's op order.

For a linear target with base output ``y = W x`` the rewritten graph computes (other kinds: their strategy's
``emit``; embedding reads indices: no cast, no dropout)::

    x_l   = dropout(x.to(adapter_dtype))          # cast only when dtypes differ; dropout only when p > 0
    delta = F.linear(F.linear(x_l, A), B)         # B A x   (A: [r, in], B: [out, r])
    y'    = (y + delta * s).to(y.dtype)           # one `+ delta * s` per adapter, as PEFT does

Example::

    insert_plain(graph, target, node, [("default", unit)], inputs, torch.float32)
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import AdapterError
from ..kinds.linear import sliced_b
from ..targets import Target, arg
from .common import ident, new_node


def insert_plain(graph: fx.Graph, t: Target, node: fx.Node, branches: list, inputs, base_dtype: torch.dtype) -> None:
    """Add each ``(adapter, unit)`` branch to ``node``'s output; every later use of ``node`` reads the sum."""
    x, out, first = arg(node, *t.input_at), node, None
    with graph.inserting_before(node.next):  # new nodes go right after ``node``, in creation order
        for adapter, unit in branches:
            stem = ident(t.key if adapter == "default" else f"{t.key}_{adapter}")
            tag = {"adapter": adapter, "key": t.key, "role": "branch"}

            def new(op, target, args, suffix, kwargs=None, stem=stem, tag=tag):
                return new_node(graph, op, target, args, f"{stem}_{suffix}", tag, kwargs)

            params = {"lora_A": inputs.tensor(adapter, t, "lora_A"), "lora_B": inputs.tensor(adapter, t, "lora_B")}
            if unit.use_dora:
                out = _dora(graph, t, node, out, x, adapter, unit, params, inputs, base_dtype, new)
            else:
                out = _lora(graph, t, out, x, adapter, unit, params, inputs, base_dtype, new)
            first = first or out
        if any(u.lora_A.dtype != base_dtype and not u.use_dora for _, u in branches):
            out = new_node(graph, "call_method", "to", (out, base_dtype), f"{ident(t.key)}_lora_out",
                           {"key": t.key, "role": "out"})
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not first)


def _lora(graph, t, y, x, adapter, unit, params, inputs, base_dtype, new) -> fx.Node:
    strategy = t.strategy
    if strategy.reads_activation and unit.lora_A.dtype != base_dtype:
        x = new("call_method", "to", (x, unit.lora_A.dtype), "lora_in")
    if strategy.reads_activation and unit.dropout_p > 0:
        x = new("call_module", inputs.dropout(adapter, t), (x,), "lora_dropout")
    b_bias = inputs.tensor(adapter, t, "lora_B_bias") if unit.lora_bias else None
    b = params["lora_B"]
    if unit.slices:  # each output slice's B block, placed in PEFT's whole-layer B
        b = new("call_function", sliced_b, (b, unit.slices, t.out_features), "lora_b_slices")
    delta = strategy.emit(graph, t.geometry, x, params["lora_A"], b, b_bias, "", new)
    scaled = new("call_function", operator.mul, (delta, unit.scaling), "lora_scaled")
    return new("call_function", operator.add, (y, scaled), "lora")


def _dora(graph, t, node, y, x, adapter, unit, params, inputs, base_dtype, new) -> fx.Node:
    if unit.lora_A.dtype != base_dtype:
        raise AdapterError(f"DoRA on {t.key!r} needs the adapter in the base weight's dtype ({base_dtype}); "
                           "lorafy with autocast_adapter_dtype=False.")
    params["lora_magnitude_vector"] = inputs.tensor(adapter, t, "lora_magnitude_vector")
    w = inputs.weight(t) or new("get_attr", t.weight, (), "base_weight")
    bias = _bias_node(t, node, new)
    dropout = new("get_attr", inputs.dropout(adapter, t), (), "lora_dropout") if unit.dropout_p > 0 else None
    return t.strategy.emit_dora(graph, t.geometry, x, y, w, bias, params, float(unit.scaling), dropout, new)


def _bias_node(t: Target, node: fx.Node, new) -> fx.Node | None:
    ref = getattr(t.geometry, "bias", None)
    if ref is None:
        return None
    if ref.attr is not None:
        return new("get_attr", ref.attr, (), "base_bias")
    return arg(node, *ref.at)
