"""Find the nodes LoRA can attach to: one recogniser per op form, kept in a registry.

A recogniser looks at one fx node and returns a ``Target`` (adaptable), an ``Unsupported`` (a layer
of a known kind this version cannot adapt, with the reason), or None. ``find_targets`` runs every
recogniser over the graph.

Keys follow PEFT: the dotted module path (``model.layers.0.self_attn.q_proj``); for a functional use of
a parameter, the parameter path without ``.weight``.

Example::

    for t in find_targets(gm, model):
        print(t.key, t.kind, t.in_features, t.out_features)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn


@dataclass
class Target:
    key: str
    kind: str  # "linear" | "embedding" | "conv"
    node: fx.Node  # the base op whose output gets the LoRA delta added
    input_at: tuple[int, str]  # where the node takes the activation the LoRA branch reads: (position, kwarg)
    weight_path: str  # attribute path of the base weight inside the graph module
    op: str  # the op form, e.g. "Linear", "F.linear", "aten.addmm"
    in_features: int
    out_features: int
    layout: str = "out_in"  # "out_in": W is [out, in]; "in_out": W is [in, out] (GPT-2 Conv1D)
    shared: bool = False  # the weight has other uses in the graph
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific settings (conv stride, ...)

    @property
    def input(self) -> fx.Node:
        """The node's current input (read from its args, so earlier rewrites upstream are seen)."""
        return arg(self.node, *self.input_at)


@dataclass
class Unsupported:
    key: str
    kind: str
    node: fx.Node
    reason: str


@dataclass
class Context:
    """What recognisers need besides the node: the graph module, the source model, weight use counts."""

    gm: fx.GraphModule
    source: nn.Module
    param_paths: dict[int, str]
    uses: Counter

    def module(self, path: str) -> nn.Module | None:
        try:
            return self.gm.get_submodule(path)
        except AttributeError:
            return None

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
        """The owning module's path (via export's nn_module_stack) or the weight path minus ``.weight``."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            owner = _get_submodule(self.source, path)
            if owner is not None and getattr(owner, "weight", None) is param:
                return path
        return weight_path[: -len(".weight")] if weight_path.endswith(".weight") else weight_path


Recogniser = Callable[[Context, fx.Node], "Target | Unsupported | None"]
RECOGNISERS: list[Recogniser] = []


def recogniser(fn: Recogniser) -> Recogniser:
    """Register ``fn`` as a recogniser (a decorator)."""
    RECOGNISERS.append(fn)
    return fn


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def find_targets(gm: fx.GraphModule, source: nn.Module) -> list[Target | Unsupported]:
    """Every adaptable (or known-but-unsupported) node of ``gm``, in graph order."""
    ctx = Context(gm, source, _param_paths(gm), weight_uses(gm))
    found = []
    for node in gm.graph.nodes:
        if node.meta.get("lora_fx"):
            continue
        for rec in RECOGNISERS:
            t = rec(ctx, node)
            if t is not None:
                if isinstance(t, Target):
                    t.shared = ctx.uses[id(gm.get_parameter(t.weight_path))] > 1
                found.append(t)
                break
    return found


def _param_paths(gm: fx.GraphModule) -> dict[int, str]:
    return {id(p): n for n, p in gm.named_parameters(remove_duplicate=False)}


def weight_uses(gm: fx.GraphModule) -> Counter:
    """How many base op nodes read each parameter (by identity), through call_module or get_attr; nodes
    lora_fx inserted do not count."""
    uses: Counter = Counter()
    for node in gm.graph.nodes:
        if "lora_fx" in node.meta:
            continue
        if node.op == "call_module":
            w = getattr(gm.get_submodule(node.target), "weight", None)
            if isinstance(w, nn.Parameter):
                uses[id(w)] += 1
        elif node.op == "get_attr":
            try:
                p = gm.get_parameter(node.target)
            except AttributeError:
                continue
            uses[id(p)] += sum("lora_fx" not in u.meta for u in node.users)
    return uses


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


# The built-in recognisers register themselves on import.
from . import recognisers  # noqa: E402,F401
