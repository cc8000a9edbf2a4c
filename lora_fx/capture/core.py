"""Capture a model as a torch.fx GraphModule that shares the model's Parameter objects, with its repeated blocks
kept as ``Block`` submodules (see ``blocks``).

- no example inputs: ``torch.fx.symbolic_trace``, each block traced on its own;
- example inputs/kwargs: ``torch.export`` (strict=False, ``Dim.AUTO`` on every dimension), one template per
  group of identical blocks and the model around them; when templates cannot stand for the blocks (see
  ``templated``), the whole model in one piece;
- a GraphModule is taken as it is.

The captured graphs are kept pristine: every rewrite is derived from them (``passes.derive``).

Example::

    cap = capture(model, example_inputs=(ids,))
    cap.graph_module, cap.blocks, [t.key for t in cap.targets]
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ..errors import CaptureError
from ..passes.common import copy_graph
from ..targets import Target, Unsupported, arg, base_weight, find_targets, idle_modules, weight_uses
from .blocks import Block, Template
from .calls import CallSignature, call_key
from .disk import CacheEntry, cache_entries
from .experts import native_grouped
from .exporting import export_program, share_parameters
from .masks import elide_masks
from .modes import check_traced, mode_dependent
from .quantized import swap_quantized
from .templated import TemplateMismatch, capture_templated, reproduces
from .traced import trace_with_blocks


@dataclass
class Captured:
    graph_module: fx.GraphModule  # the live outer module: each rebuild gives it a new graph
    graph: fx.Graph  # the pristine outer graph
    source: nn.Module  # the model captured (module types and paths are read from it)
    method: str  # "symbolic_trace" | "export" | "graph_module"
    mode_fixed: bool  # the graph's own train()/eval() cannot be switched (exported graphs)
    templates: dict[str, Template] = field(default_factory=dict)
    blocks: dict[str, Block] = field(default_factory=dict)  # block path -> Block (registered in graph_module)
    calls: Counter = field(default_factory=Counter)  # block path -> call sites in the outer graph
    targets: list[Target | Unsupported] = field(default_factory=list)  # full keys, in model order
    program_key: str = ""  # which of a Block's programs this capture's graph runs ("": the first capture)
    call: tuple | None = None  # the call key the graph is specialised on (export), see ``calls``
    positional: int = 0  # how many of the example inputs were passed by position (the graph expects the same)
    template_ids: dict[str, str] = field(default_factory=dict)  # block path -> the id of its template here
    key_prefix: str = ""  # added to a block path to name its targets like the model the adapters were made for
    training: bool = False  # the mode an exported graph was captured in
    mode_dependent: bool = False  # an exported graph of the other mode would differ (``modes.mode_dependent``)

    def template_of(self, block: str) -> Template:
        return self.templates[self.template_ids[block]]

    def pristine_node(self, t: Target) -> fx.Node:
        """The target's base node in its pristine graph."""
        graph = self.templates[t.graph].graph if t.graph else self.graph
        return next(n for n in graph.nodes if n.name == t.node)

    def weight(self, t: Target) -> torch.Tensor:
        """The target's base weight (an inert target's from the model: no graph reads it)."""
        return base_weight(self.source if t.inert else self.graph_module, t.weight_path)

    def bias_param(self, t: Target) -> nn.Parameter | None:
        """The target's base bias parameter, if it has one the graph reads as a parameter."""
        ref = getattr(t.geometry, "bias", None)
        if ref is None:
            return None
        if t.inert:
            return getattr(self.source.get_submodule(t.key), "bias", None)
        path = ref.attr
        if path is None:
            node = arg(self.pristine_node(t), *ref.at)
            if not isinstance(node, fx.Node) or node.op != "get_attr":
                return None
            path = node.target
        try:
            return self.graph_module.get_parameter(f"{t.block}.{path}" if t.block else path)
        except AttributeError:
            return None


CAPTURE_LOCK = threading.RLock()  # torch.export and symbolic_trace keep global state: one capture at a time


def capture(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict[str, Any] | None = None, *,
            templates: bool = True, dims: dict[str, Any] | None = None) -> Captured:
    """Capture ``model``; see the module docstring for which path is taken (``templates=False``: export in one
    piece, for graphs whose blocks differ by index, such as a KV cache's layers; ``dims``: dynamic shapes by
    argument name, see ``export_program``). Captures are serialised: the tracers' global state allows one at a
    time per process."""
    with CAPTURE_LOCK:
        return _capture(model, example_inputs, example_kwargs, templates, dims)


def _capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any] | None,
             templates: bool, dims: dict[str, Any] | None = None) -> Captured:
    if not isinstance(model, nn.Module):
        raise CaptureError(f"lorafy expects a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    swap_quantized(model)  # bitsandbytes layers -> QuantLinear (graph capture cannot fake their weights)
    if isinstance(model, fx.GraphModule) and not example_inputs and not kwargs:
        return _finish(model, model, "graph_module", _mode_fixed(model), {}, {})
    if example_inputs or kwargs:
        example_inputs, kwargs = distinct_inputs(example_inputs, kwargs)
        key = call_key(CallSignature.of(model).bind(example_inputs, kwargs))
        cached = cache_entries(model, key, len(example_inputs))
        try:
            if not templates or dims:
                raise TemplateMismatch("templates not wanted")
            gm, found, blocks = capture_templated(model, example_inputs, kwargs, cached("templated"))
        except TemplateMismatch:
            form = f"whole {dims}" if dims else "whole"
            gm, found, blocks = _whole(model, example_inputs, kwargs, cached(form), dims), {}, {}
        share_parameters(gm, model)
        elide_masks(gm, found, blocks)
        cap = _finish(gm, model, "export", True, found, blocks)
        cap.call, cap.positional, cap.training = key, len(example_inputs), model.training
        cap.mode_dependent = mode_dependent(model, example_inputs, kwargs)
        return cap
    try:
        gm, templates, blocks = trace_with_blocks(model)
    except Exception as e:
        raise CaptureError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__} ({type(e).__name__}: {e}). "
            "Pass example_inputs=(...) and/or example_kwargs={...} to lorafy so the model is captured "
            "with torch.export instead."
        ) from e
    check_traced(model, *_codes(gm, templates), lambda: _codes(*trace_with_blocks(model)[:2]))
    return _finish(gm, model, "symbolic_trace", False, templates, blocks)


def _whole(model: nn.Module, args: tuple, kwargs: dict[str, Any], entry: CacheEntry | None,
           dims: dict[str, Any] | None = None) -> fx.GraphModule:
    """The model exported in one piece (from the capture cache when ``entry`` holds a program that still
    reproduces the model's output)."""
    found = entry.load(model, args, kwargs) if entry is not None else None
    if found is not None:
        gm = found[0].module()
        if reproduces(gm, model, args, kwargs):
            return gm
        entry.drop()
    program = export_program(model, args, kwargs, dims)
    if entry is not None:
        entry.store(program, {}, model)
    return program.module()


def _codes(gm: fx.GraphModule, templates: dict[str, Template]) -> tuple[str, dict[str, str]]:
    """The traced code of a graph module without its block calls' bodies, and of each template."""
    return gm.code, {tid: fx.GraphModule(t.module, t.graph).code for tid, t in templates.items()}


def distinct_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Example inputs as the graph should see them: a tensor that is a view, or shares memory with an earlier
    input (``labels=input_ids``), is copied, so the capture neither guards on a view's base nor merges two
    inputs into one graph input."""
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if t._is_view() or (ptr is not None and ptr in seen):
            t = t.clone()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None:
            seen.add(ptr)
        return t

    return pytree.tree_map_only(torch.Tensor, own, (tuple(args), dict(kwargs)))


def _finish(gm, source, method, mode_fixed, templates, blocks) -> Captured:
    if native_grouped(gm.graph):
        gm.recompile()
    for t in templates.values():
        native_grouped(t.graph)
    cap = Captured(gm, copy_graph(gm.graph), source, method, mode_fixed, templates, blocks)
    cap.template_ids = {path: block.template for path, block in blocks.items()}
    cap.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in blocks)
    for t in templates.values():
        t.targets = find_targets(t.graph, blocks[t.id], source.get_submodule(t.id), t.id)
    uses = weight_uses(gm.graph, gm)
    for path, n in cap.calls.items():
        uses.update(weight_uses(cap.template_of(path).graph, blocks[path], n))
    outer = find_targets(gm.graph, gm, source)
    key_uses = Counter(t.key for t in outer if isinstance(t, Target))
    placed: list[Target | Unsupported] = []
    seen: set[str] = set()
    by_name: dict[str, list] = {}
    for t in outer:
        by_name.setdefault(t.node, []).append(t)
    for node in gm.graph.nodes:
        if node.name in by_name:
            placed += by_name[node.name]
        elif node.op == "call_module" and node.target in blocks and node.target not in seen:
            seen.add(node.target)
            for t in cap.template_of(node.target).targets:
                placed.append(t.placed(node.target))
                key_uses[placed[-1].key] += cap.calls[node.target] if isinstance(t, Target) else 0
    cap.targets = [_mark_shared(t, gm, uses, key_uses) for t in placed]
    cap.targets += idle_modules(source, {t.key for t in placed})
    return cap


def _mark_shared(t, root: nn.Module, uses: Counter, key_uses: Counter):
    if not isinstance(t, Target):
        return t
    weight = base_weight(root, t.weight_path)
    return replace(t, shared=True) if uses[id(weight)] > key_uses[t.key] else t


def _mode_fixed(gm: fx.GraphModule) -> bool:
    try:
        gm.train(gm.training)
    except NotImplementedError:
        return True
    return False
