"""What the passes share: tagged node creation, graph copies, and where a graph reads its adapter tensors from.

The outer graph reads adapter tensors from the store with ``get_attr`` (``StoreInputs``); a block program takes
them as extra placeholders (``BlockInputs``), which the outer graph's call of the block fills in. Either way a
pass asks ``inputs.unit_tensor(branch, target, "lora_A")`` and gets a node.

Example::

    inputs = StoreInputs(graph, route=None)
    a = inputs.unit_tensor(branch, target, "lora_A")     # get_attr lora.default.<unit>.lora_A
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from torch import fx

from ..ops.invocation import invocation_mask
from .plan import Ref

TAG = "lora_fx"


def new_node(graph: fx.Graph, op: str, target: Any, args: tuple, name: str, tag: dict[str, Any],
             kwargs: dict | None = None) -> fx.Node:
    """Create a node tagged as lora_fx's at the current insert point."""
    node = graph.create_node(op, target, args, kwargs or {}, name=name)
    node.meta[TAG] = dict(tag)
    return node


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A fresh copy of ``graph`` (nodes, names, metadata and code generator) for a pass to rewrite."""
    with warnings.catch_warnings():  # deep-copying export's pytree specs warns on some torch versions
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def ident(text: str) -> str:
    """``text`` as a Python identifier (``model.layers.0`` -> ``model_layers_0``)."""
    name = re.sub(r"\W", "_", text)
    return name if name and not name[0].isdigit() else f"_{name}"


class StoreInputs:
    """Adapter tensors of the outer graph: ``get_attr`` nodes on the store; ``route``: the graph's route node (a
    routed plan), ``untied``: key -> path of a merged weight's own copy."""

    def __init__(self, graph: fx.Graph, route: fx.Node | None = None, untied: dict[str, str] | None = None) -> None:
        self.graph, self._route, self.untied = graph, route, dict(untied or {})
        self._weights: dict[str, fx.Node] = {}
        self._masks: dict[tuple[int, ...], fx.Node | None] = {}

    def invocation_mask(self, tokens: tuple[int, ...]) -> fx.Node | None:
        """``[batch, length]``: True from the last occurrence of ``tokens`` in each row of the graph's ``input_ids``
        on (``ops.invocation.invocation_mask``); None when the graph takes no ``input_ids``."""
        if tokens not in self._masks:
            ids = next((n for n in self.graph.nodes if n.op == "placeholder" and n.target == "input_ids"), None)
            node = None
            if ids is not None:
                last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
                with self.graph.inserting_after(last):
                    node = new_node(self.graph, "call_function", invocation_mask, (ids, tokens),
                                    "lora_invocation_mask", {"role": "input"})
            self._masks[tokens] = node
        return self._masks[tokens]

    def _get(self, path: str, name: str) -> fx.Node:
        return new_node(self.graph, "get_attr", path, (), ident(name), {"role": "input"})

    def unit_tensor(self, branch, t, attr: str) -> fx.Node:
        return self._get(f"{branch.path}.{attr}", f"{t.key}_{branch.adapter}_{attr}")

    def unit_dropout(self, branch, t) -> str:
        return f"{branch.path}.dropout"

    def bank_tensor(self, routed, t, what: str) -> fx.Node:
        return self._get(f"{routed.bank}.{routed.stem}__{what}", f"{t.key}_bank_{what}")

    def bank_dropout(self, routed, t) -> str:
        return f"{routed.bank}.dropouts.{routed.stem}"

    def route(self) -> fx.Node:
        return self._route

    def weight(self, t) -> fx.Node | None:
        path = self.untied.get(t.key)
        if path is None:
            return None
        if t.key not in self._weights:
            self._weights[t.key] = new_node(self.graph, "get_attr", path, (), ident(f"{t.key}_merged_weight"),
                                            {"role": "untied"})
        return self._weights[t.key]


class BlockInputs:
    """Adapter tensors of a block program: placeholders after the block's own inputs. ``order`` lists what each
    one is (a ``Ref``, or ``"route"``) for the call sites; ``dropouts`` lists ``(Ref, module name)`` for the
    block's ``lora_dropout`` modules (``attr`` "dropout")."""

    def __init__(self, graph: fx.Graph, untied: set[str]) -> None:
        self.graph, self.untied = graph, untied
        self.order: list[Ref | str] = []
        self.dropouts: list[tuple[Ref, str]] = []
        self._weights: dict[str, fx.Node] = {}
        self._route: fx.Node | None = None
        self._masks: dict[tuple[int, ...], fx.Node] = {}
        self._last = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def _placeholder(self, name: str, what: Ref | str) -> fx.Node:
        self.order.append(what)
        with self.graph.inserting_after(self._last):
            self._last = self.graph.placeholder(ident(name))
        self._last.meta[TAG] = {"role": "input"}
        return self._last

    def unit_tensor(self, branch, t, attr: str) -> fx.Node:
        return self._placeholder(f"{branch.adapter}__{t.key}__{attr}", Ref("unit", t.key, attr, branch.adapter))

    def unit_dropout(self, branch, t) -> str:
        name = ident(f"{branch.adapter}__{t.key}")
        self.dropouts.append((Ref("unit", t.key, "dropout", branch.adapter), name))
        return f"lora_dropout.{name}"

    def bank_tensor(self, routed, t, what: str) -> fx.Node:
        return self._placeholder(f"bank__{t.key}__{what}", Ref("bank", t.key, what))

    def bank_dropout(self, routed, t) -> str:
        name = ident(f"bank__{t.key}")
        self.dropouts.append((Ref("bank", t.key, "dropout"), name))
        return f"lora_dropout.{name}"

    def route(self) -> fx.Node:
        if self._route is None:
            self._route = self._placeholder("bank__route", "route")
        return self._route

    def invocation_mask(self, tokens: tuple[int, ...]) -> fx.Node:
        """The outer graph's invocation mask for ``tokens`` (see ``StoreInputs``), as a block input."""
        if tokens not in self._masks:
            self._masks[tokens] = self._placeholder(f"invocation__{len(self._masks)}", ("invocation", tokens))
        return self._masks[tokens]

    def weight(self, t) -> fx.Node | None:
        if t.key not in self.untied:
            return None
        if t.key not in self._weights:
            self._weights[t.key] = self._placeholder(f"merged__{t.key}__weight", Ref("untied", t.key, "weight"))
        return self._weights[t.key]
