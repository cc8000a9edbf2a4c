"""Insert pass: add each active adapter's LoRA branch after its target node.

For a linear target with base output ``y = W x`` the rewritten graph computes (embedding:
``F.embedding(idx, A.T) @ B.T``; conv: ``conv_B(conv_A(x))`` with A carrying the base kernel, stride,
padding and dilation, B a 1x1 conv)::

    x_l   = dropout(x.to(adapter_dtype))          # cast only when dtypes differ; dropout only when p > 0
    delta = F.linear(F.linear(x_l, A), B)         # B A x   (A: [r, in], B: [out, r])
    y'    = (y + delta * s).to(y.dtype)           # one `+ delta * s` per active adapter, as PEFT does

Example::

    insert_lora(gm, lm.adapters, lm.targets, ["default"])
    print(gm.code)   # ... q_proj_lora_a = torch.nn.functional.linear(x, self.lora.default...lora_A) ...
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from .. import ops
from ..errors import AdapterError
from ..store import AdapterStore
from ..targets import Target, arg
from .common import finish, new_node
from .fuse import emit_group, fusable, sibling_group

DeltaBuilder = Callable[[fx.Graph, Target, str, fx.Node, dict], fx.Node]


def _linear_delta(g: fx.Graph, t: Target, unit_path: str, x: fx.Node, tag: dict) -> fx.Node:
    n = unit_path.rsplit(".", 1)[-1]
    a = new_node(g, "get_attr", f"{unit_path}.lora_A", (), f"{n}_lora_A", tag)
    b = new_node(g, "get_attr", f"{unit_path}.lora_B", (), f"{n}_lora_B", tag)
    h = new_node(g, "call_function", F.linear, (x, a), f"{n}_lora_a", tag)
    return new_node(g, "call_function", F.linear, (h, b, _lora_bias(g, unit_path, n, tag)), f"{n}_lora_b", tag)


def _lora_bias(g: fx.Graph, unit_path: str, n: str, tag: dict) -> fx.Node | None:
    """lora_B's bias (PEFT's ``lora_bias=True``), or None."""
    if not tag.get("lora_bias"):
        return None
    return new_node(g, "get_attr", f"{unit_path}.lora_B_bias", (), f"{n}_lora_B_bias", tag)


def _embedding_delta(g: fx.Graph, t: Target, unit_path: str, idx: fx.Node, tag: dict) -> fx.Node:
    """PEFT's embedding branch: ``F.embedding(idx, A.T, padding_idx) @ B.T``."""
    n = unit_path.rsplit(".", 1)[-1]
    a = new_node(g, "get_attr", f"{unit_path}.lora_A", (), f"{n}_lora_A", tag)
    b = new_node(g, "get_attr", f"{unit_path}.lora_B", (), f"{n}_lora_B", tag)
    a_t = new_node(g, "call_method", "t", (a,), f"{n}_lora_A_t", tag)
    b_t = new_node(g, "call_method", "t", (b,), f"{n}_lora_B_t", tag)
    h = new_node(g, "call_function", F.embedding, (idx, a_t), f"{n}_lora_a", tag,
                 {"padding_idx": t.extra.get("padding_idx")})
    return new_node(g, "call_function", operator.matmul, (h, b_t), f"{n}_lora_b", tag)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_delta(g: fx.Graph, t: Target, unit_path: str, x: fx.Node, tag: dict) -> fx.Node:
    """A: conv with the base kernel, stride, padding and dilation (and its padding mode); B: 1x1 conv."""
    n, e = unit_path.rsplit(".", 1)[-1], t.extra
    conv = _CONV[e["dims"]]
    if e["pad_mode"] is not None:
        x = new_node(g, "call_function", F.pad, (x, e["pad"]), f"{n}_lora_pad", tag, {"mode": e["pad_mode"]})
    a = new_node(g, "get_attr", f"{unit_path}.lora_A", (), f"{n}_lora_A", tag)
    b = new_node(g, "get_attr", f"{unit_path}.lora_B", (), f"{n}_lora_B", tag)
    h = new_node(g, "call_function", conv, (x, a, None, e["stride"], e["padding"], e["dilation"]), f"{n}_lora_a", tag)
    return new_node(g, "call_function", conv, (h, b, _lora_bias(g, unit_path, n, tag)), f"{n}_lora_b", tag)


DELTA_BUILDERS: dict[str, DeltaBuilder] = {"linear": _linear_delta, "embedding": _embedding_delta, "conv": _conv_delta}


def _bias_node(g: fx.Graph, t: Target, tag: dict) -> fx.Node | None:
    where = t.extra.get("bias")
    if where is None:
        return None
    if where[0] == "attr":
        return new_node(g, "get_attr", where[1], (), f"{t.node.name}_bias", tag)
    return arg(t.node, *where[1])


def _dora(g: fx.Graph, t: Target, unit_path: str, unit, y: fx.Node, tag: dict) -> fx.Node:
    """One node computing PEFT's DoRA output from the base output ``y`` (see ops.dora_*)."""
    n = unit_path.rsplit(".", 1)[-1]
    a = new_node(g, "get_attr", f"{unit_path}.lora_A", (), f"{n}_lora_A", tag)
    b = new_node(g, "get_attr", f"{unit_path}.lora_B", (), f"{n}_lora_B", tag)
    m = new_node(g, "get_attr", f"{unit_path}.lora_magnitude_vector", (), f"{n}_lora_magnitude", tag)
    w = new_node(g, "get_attr", t.weight_path, (), f"{n}_base_weight", tag)
    dropout = (new_node(g, "get_attr", f"{unit_path}.dropout", (), f"{n}_lora_dropout", tag)
               if unit.dropout_p > 0 else None)
    x, s = t.input, float(unit.scaling)
    if t.kind == "embedding":
        args = (x, y, w, a, b, m, s, t.extra.get("padding_idx"))
        return new_node(g, "call_function", ops.dora_embedding, args, f"{n}_dora", tag)
    bias = _bias_node(g, t, tag)
    if t.kind == "linear":
        args = (x, y, w, bias, a, b, m, s, t.layout == "in_out", dropout)
        return new_node(g, "call_function", ops.dora_linear, args, f"{n}_dora", tag)
    e = t.extra
    if e["pad_mode"] is not None:
        x = new_node(g, "call_function", F.pad, (x, e["pad"]), f"{n}_lora_pad", tag, {"mode": e["pad_mode"]})
    args = (x, y, w, bias, a, b, m, s, e["stride"], e["padding"], e["dilation"], dropout)
    return new_node(g, "call_function", ops.dora_conv, args, f"{n}_dora", tag)


def insert_lora(
    gm: fx.GraphModule, store: AdapterStore, targets: list[Target], adapters: list[str], store_name: str = "lora",
    fuse: bool = True,
) -> list[dict]:
    """Rewrite ``gm`` so every target gets ``+ s·ΔW x`` for each adapter in ``adapters`` that has a unit
    for its key. With ``fuse`` (and one adapter), eligible linear targets go through the sibling-fusion
    pass (``passes.fuse``). Returns one record per (target, adapter) inserted, with the form used."""
    records: list[dict] = []
    done: set[int] = set()
    for i, t in enumerate(targets):
        if id(t.node) in done:
            continue
        units = [(a, store.units(a).get(t.key)) for a in adapters]
        units = [(a, u) for a, u in units if u is not None]
        if not units:
            continue
        if fuse and len(units) == 1 and fusable(gm, t, units[0][1]):
            adapter, unit = units[0]
            rest = [u for u in targets[i + 1:] if id(u.node) not in done and u.key in store.units(adapter)
                    and fusable(gm, u, store.unit(adapter, u.key)) and store.unit(adapter, u.key).dropout_p == 0]
            group = sibling_group(gm, t, rest, dropout=unit.dropout_p > 0)
            grp = emit_group(gm, store, group, adapter, store_name)
            for member in group:
                done.add(id(member.node))
                records.append({"key": member.key, "adapter": adapter, "form": "fused", "group": grp.name,
                                "dropout": unit.dropout_p > 0})
            continue
        _insert_plain(gm, store, t, units, store_name)
        records += [{"key": t.key, "adapter": a, "form": "plain", "group": None, "dropout": u.dropout_p > 0}
                    for a, u in units]
    finish(gm)
    return records


def _insert_plain(gm: fx.GraphModule, store: AdapterStore, t: Target, units: list, store_name: str) -> None:
    g = gm.graph
    base_dtype = gm.get_parameter(t.weight_path).dtype
    out = t.node
    inserted: list[fx.Node] = []
    with g.inserting_before(t.node.next):
        for adapter, unit in units:
            tag = {"adapter": adapter, "key": t.key, "base": t.node.name, "role": "branch",
                   "lora_bias": unit.lora_bias}
            unit_path = f"{store_name}.{store.unit_path(adapter, t.key)}"
            name = unit_path.rsplit(".", 1)[-1]
            if unit.use_dora:
                if unit.lora_A.dtype != base_dtype:
                    raise AdapterError(f"DoRA on {t.key!r} needs the adapter in the base weight's dtype "
                                       f"({base_dtype}); lorafy with autocast_adapter_dtype=False.")
                out = _dora(g, t, unit_path, unit, out, tag)
                inserted.append(out)
                continue
            x = t.input
            reads_activation = t.kind != "embedding"  # an embedding's input is indices: no cast, no dropout
            if reads_activation and unit.lora_A.dtype != base_dtype:
                x = new_node(g, "call_method", "to", (x, unit.lora_A.dtype), f"{name}_lora_in", tag)
            if reads_activation and unit.dropout_p > 0:
                x = new_node(g, "call_module", f"{unit_path}.dropout", (x,), f"{name}_lora_dropout", tag)
            delta = DELTA_BUILDERS[t.kind](g, t, unit_path, x, tag)
            scaled = new_node(g, "call_function", operator.mul, (delta, unit.scaling), f"{name}_lora_scaled", tag)
            out = new_node(g, "call_function", operator.add, (out, scaled), f"{name}_lora", tag)
            inserted.append(out)
        if any(u.lora_A.dtype != base_dtype and not u.use_dora for _, u in units):
            out = new_node(g, "call_method", "to", (out, base_dtype), f"{name}_lora_out", tag)
    out.meta["lora_fx"]["role"] = "out"
    first = inserted[0]
    t.node.replace_all_uses_with(out, delete_user_cb=lambda user, first=first: user is not first)


def adapter_dtype(base: torch.dtype, autocast: bool) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: fp16/bf16 base weights get float32 adapters."""
    return torch.float32 if autocast and base in (torch.float16, torch.bfloat16) else base
