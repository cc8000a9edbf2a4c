"""What the passes share: tagged node creation, and where a graph reads its adapter tensors from.

The outer graph reads adapter tensors from the store with ``get_attr`` (``StoreInputs``); a block program takes
them as extra placeholders (``BlockInputs``), which the outer graph's call of the block fills in. Either way a
pass asks ``inputs.tensor(adapter, target, "lora_A")`` and gets a node.

Example::

    inputs = StoreInputs(graph, "lora", store, untied={})
    a = inputs.tensor("default", target, "lora_A")     # get_attr lora.default.<unit>.lora_A
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from torch import fx

TAG = "lora_fx"
BANK = "__bank__"  # the adapter bank's name in the store (``store.BANK``)


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
    """Adapter tensors of the outer graph: ``get_attr`` nodes on the store (``<store>.<adapter>.<unit>.<attr>``);
    a merged key whose weight was untied reads its own copy (``untied``: key -> attribute path)."""

    def __init__(self, graph: fx.Graph, store_name: str, store, untied: dict[str, str]) -> None:
        self.graph, self.store_name, self.store, self.untied = graph, store_name, store, untied
        self._weights: dict[str, fx.Node] = {}

    def _unit(self, adapter: str, target) -> str:
        return f"{self.store_name}.{self.store.unit_path(adapter, target.key)}"

    def tensor(self, adapter: str, target, attr: str) -> fx.Node:
        path = f"{self._unit(adapter, target)}.{attr}"
        return new_node(self.graph, "get_attr", path, (), ident(f"{target.key}_{adapter}_{attr}"), {"role": "input"})

    def dropout(self, adapter: str, target) -> str:
        return f"{self._unit(adapter, target)}.dropout"

    def bank(self, key: str, what: str) -> fx.Node:
        """A bank tensor of ``key`` (``A``, ``B``, ``scales``) or the route (``what="route"``, read once)."""
        if what == "route" and "\0route" in self._weights:
            return self._weights["\0route"]
        path = f"{self.store_name}.{BANK}.{self.store.bank.attr(key, what)}"
        if what != "route":
            return new_node(self.graph, "get_attr", path, (), ident(f"{key}_bank_{what}"), {"role": "input"})
        last = [n for n in self.graph.nodes if n.op == "placeholder"]
        with self.graph.inserting_after(last[-1]) if last else self.graph.inserting_before(None):
            node = new_node(self.graph, "get_attr", path, (), "lora_route", {"role": "input"})
        self._weights["\0route"] = node
        return node

    def bank_dropout(self, key: str) -> str:
        return f"{self.store_name}.{BANK}.{self.store.bank.dropout_path(key)}"

    def weight(self, target) -> fx.Node | None:
        path = self.untied.get(target.key)
        if path is None:
            return None
        if target.key not in self._weights:
            self._weights[target.key] = new_node(self.graph, "get_attr", path, (), ident(f"{target.key}_merged_weight"),
                                                 {"role": "untied"})
        return self._weights[target.key]


class BlockInputs:
    """Adapter tensors of a block program: placeholders after the block's own inputs. ``order`` lists what each
    one is, ``(adapter, relative key, attr)`` (adapter None: the key's merged weight copy), for the call site;
    ``dropouts`` lists ``(adapter, relative key, module name)`` for the block's ``lora_dropout`` modules."""

    def __init__(self, graph: fx.Graph, untied: set[str]) -> None:
        self.graph, self.untied = graph, untied
        self.order: list[tuple[str | None, str, str]] = []
        self.dropouts: list[tuple[str, str, str]] = []
        self._weights: dict[str, fx.Node] = {}
        self._last = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def _placeholder(self, name: str) -> fx.Node:
        with self.graph.inserting_after(self._last):
            self._last = self.graph.placeholder(name)
        self._last.meta[TAG] = {"role": "input"}
        return self._last

    def tensor(self, adapter: str, target, attr: str) -> fx.Node:
        self.order.append((adapter, target.key, attr))
        return self._placeholder(ident(f"{adapter}__{target.key}__{attr}"))

    def dropout(self, adapter: str, target) -> str:
        name = ident(f"{adapter}__{target.key}")
        self.dropouts.append((adapter, target.key, name))
        return f"lora_dropout.{name}"

    def bank(self, key: str, what: str) -> fx.Node:
        """A bank tensor of ``key`` as a placeholder (order entry ``(BANK, key, what)``); the route once."""
        if what == "route" and "\0route" in self._weights:
            return self._weights["\0route"]
        self.order.append((BANK, key, what))
        node = self._placeholder(ident(f"bank__{key}__{what}") if what != "route" else "bank__route")
        if what == "route":
            self._weights["\0route"] = node
        return node

    def bank_dropout(self, key: str) -> str:
        name = ident(f"bank__{key}")
        self.dropouts.append((BANK, key, name))
        return f"lora_dropout.{name}"

    def weight(self, target) -> fx.Node | None:
        if target.key not in self.untied:
            return None
        if target.key not in self._weights:
            self.order.append((None, target.key, "weight"))
            self._weights[target.key] = self._placeholder(ident(f"merged__{target.key}__weight"))
        return self._weights[target.key]
