"""Find the nodes LoRA can attach to: one recogniser per op form, kept in a registry.

A recogniser looks at one fx node and returns a ``Target`` (adaptable), an ``Unsupported`` (a layer of a known
kind this version cannot adapt, with the reason), or None. ``find_targets`` runs every recogniser over a graph:
the outer graph of a captured model, or the template graph of a repeated block (keys relative to the block;
``Target.placed`` gives a block member's copy with its full key).

Keys follow PEFT: the dotted module path (``model.layers.0.self_attn.q_proj``); for a functional use of a
parameter, the parameter path without ``.weight``.

Example::

    for t in find_targets(gm.graph, gm, model):
        print(t.key, t.kind, t.geometry)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from ..kinds import Kind


@dataclass(frozen=True)
class Target:
    key: str  # PEFT's key; relative to the block for a template's target
    strategy: Kind
    geometry: Any  # LinearGeometry | EmbeddingGeometry | ConvGeometry
    node: str | None  # name of the base op node (its output gets the LoRA delta) in its pristine graph
    input_at: tuple[int, str]  # where the node takes the activation the branch reads: (position, keyword)
    weight: str  # attribute path of the base weight, relative to the graph's module
    op: str  # the op form, e.g. "Linear", "F.linear", "aten.addmm"
    graph: str = ""  # "" for the outer graph, else the template id
    block: str = ""  # the block member path ("" outside blocks)
    shared: bool = False  # the weight has uses that are not this key's
    inert: bool = False  # a module the forward never calls: adapted (saved, loaded, merged) but never in a graph

    @property
    def kind(self) -> str:
        return self.strategy.name

    @property
    def weight_path(self) -> str:
        """The weight's attribute path from the graph module (the LoraModel's ``graph_module``)."""
        return f"{self.block}.{self.weight}" if self.block else self.weight

    @property
    def quantized(self) -> str:
        """The quantized base's format ("nf4", "fp4", "int8"), or "" for a full-precision weight."""
        return getattr(self.geometry, "quant", "")

    @property
    def in_features(self) -> int:
        return self.geometry.in_features

    @property
    def out_features(self) -> int:
        return self.geometry.out_features

    def placed(self, block: str) -> Target:
        """This template target as it sits in block member ``block``."""
        return replace(self, key=f"{block}.{self.key}", block=block)


@dataclass(frozen=True)
class Unsupported:
    key: str
    kind: str
    node: str
    reason: str

    def placed(self, block: str) -> Unsupported:
        return replace(self, key=f"{block}.{self.key}")


@dataclass
class Context:
    """What recognisers need besides the node: the graph's module (to resolve attributes) and the source
    module it was captured from (to name keys)."""

    gm: nn.Module
    source: nn.Module

    def module(self, path: str) -> nn.Module | None:
        return _get_submodule(self.gm, path)

    def source_module(self, path: str) -> nn.Module | None:
        """The captured model's module at ``path`` (the graph module keeps only attributes, not module types)."""
        return _get_submodule(self.source, path)

    def param_of(self, node: Any) -> tuple[str, nn.Parameter] | None:
        """(path, parameter) when ``node`` is a get_attr of a Parameter."""
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        try:
            p = self.gm.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target, p

    def key_for(self, node: fx.Node, weight_path: str, param: nn.Parameter) -> str:
        """The owning module's path (via export's nn_module_stack) or the weight path minus ``.weight``; a
        MultiheadAttention's ``in_proj_weight``: the attention module's path, as PEFT names it."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            owner = _get_submodule(self.source, path)
            if owner is not None and getattr(owner, "weight", None) is param:
                return path
        owner, _, leaf = weight_path.rpartition(".")
        if leaf == "in_proj_weight" and isinstance(_get_submodule(self.source, owner), nn.MultiheadAttention):
            return owner  # PEFT's key for LoRA on a MultiheadAttention's packed q/k/v projection
        return weight_path[: -len(".weight")] if weight_path.endswith(".weight") else weight_path


Recogniser = Callable[[Context, fx.Node], "Target | Unsupported | None"]
RECOGNISERS: list[Recogniser] = []
Alias = Callable[[Context, Target], "Target | None"]
ALIASES: list[Alias] = []  # second names for a found target (a linear's weight as a parameter target)


def recogniser(fn: Recogniser) -> Recogniser:
    """Register ``fn`` as a recogniser (a decorator)."""
    RECOGNISERS.append(fn)
    return fn


def alias(fn: Alias) -> Alias:
    """Register ``fn`` as an alias maker (a decorator): it may give a found target a second key of another kind."""
    ALIASES.append(fn)
    return fn


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def find_targets(graph: fx.Graph, gm: nn.Module, source: nn.Module, graph_id: str = "") -> list[Target | Unsupported]:
    """Every adaptable (or known-but-unsupported) node of ``graph``, in graph order. ``gm`` resolves the graph's
    attributes; ``source`` is the module captured (keys are named from it)."""
    ctx = Context(gm, source)
    found: list[Target | Unsupported] = []
    for node in graph.nodes:
        for rec in RECOGNISERS:
            t = rec(ctx, node)
            if t is not None:
                found.append(replace(t, graph=graph_id) if isinstance(t, Target) else t)
                if isinstance(t, Target):
                    found += [replace(a, graph=graph_id) for make in ALIASES if (a := make(ctx, t)) is not None]
                break
    return found


def idle_modules(source: nn.Module, known: set[str]) -> list[Target]:
    """Targets for the modules of ``source`` that a recogniser knows (Linear, Embedding, Conv, Conv1D) but no
    captured graph calls (a model's unused head): ``inert``, with weights read from ``source``. PEFT adapts them
    too, so their adapters must load and save back."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    ctx = Context(source, source)
    found = []
    for path, module in source.named_modules():
        if not path or path in known or any(True for _ in module.children()):
            continue
        node = graph.call_module(path, (x,))
        for rec in RECOGNISERS:
            t = rec(ctx, node)
            if isinstance(t, Target):
                found.append(replace(t, node=None, inert=True))
                break
    return found


def weight_uses(graph: fx.Graph, root: nn.Module, calls: int = 1) -> Counter:
    """How many times each parameter (by identity) is read by the graph's ops, through call_module or get_attr,
    times ``calls`` (how often the graph runs per forward: a shared block runs several times)."""
    uses: Counter = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            w = getattr(_get_submodule(root, node.target), "weight", None)
            if isinstance(w, nn.Parameter):
                uses[id(w)] += calls
        elif node.op == "get_attr":
            try:
                p = root.get_parameter(node.target)
            except AttributeError:
                continue
            uses[id(p)] += calls * len(node.users)
    return uses


def base_weight(root: nn.Module, path: str) -> torch.Tensor:
    """A target's base weight: its Parameter, or a quantized base's packed buffer."""
    try:
        return root.get_parameter(path)
    except AttributeError:
        return root.get_buffer(path)


def compute_dtype(t: Target, weight: torch.Tensor) -> torch.dtype:
    """The dtype a target's base op computes in: its weight's, or a quantized base's compute dtype."""
    return getattr(t.geometry, "compute_dtype", None) or weight.dtype


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
