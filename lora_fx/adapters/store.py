"""The adapter store: an nn.Module registered on the graph module as ``lora``, holding every adapter's tensors.

Layout: ``lora.<adapter>.<unit>.lora_A`` / ``.lora_B`` / ``.dropout``; one unit per target key. Each adapter's entry
also holds its PEFT options (``bias``), the rules that matched nothing, and the trainable copies of
``modules_to_save``; ``lora.__bank__`` is the adapter bank when adapters are routed per row. Because the store is
a submodule of the graph module, ``parameters()``, ``state_dict()``, optimisers and ``torch.compile`` see the
adapters directly. The store is what a LoraModel's committed state holds (``model.state``): only a verb's commit
attaches and detaches its children, through a transaction.

Example::

    unit = lm.adapters.unit("default", "model.layers.0.self_attn.q_proj")
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
from torch import nn

from ..errors import AdapterError
from .names import child_name
from .tokens import TokenDelta, Tokens
from .unit import LoraUnit

BANK = "__bank__"  # the adapter bank's child name
BASE = "__base__"  # the route name for "no adapter"


class Saved(nn.Module):
    """PEFT's ``modules_to_save``: trainable copies of whole modules, children named after their paths."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.paths: dict[str, str] = {}  # original module path -> child name
        taken: set[str] = set()
        for path, module in modules.items():
            self.paths[path] = child_name(path, taken, type(self))
            self.add_module(self.paths[path], module)


class AdapterEntry(nn.Module):
    """One adapter: its units (children named after their keys), ``saved`` copies, and PEFT options."""

    def __init__(self, units: list[LoraUnit], saved: Mapping[str, nn.Module] | None, bias: str,
                 unused_rules: list[str], svd_error: Mapping[str, float] | None = None,
                 tokens: Mapping[str, TokenDelta] | None = None) -> None:
        super().__init__()
        self.bias, self.unused_rules = bias, list(unused_rules)
        self.svd_error: dict[str, float] = dict(svd_error or {})  # add_weighted_adapter: key -> relative error
        self.peft_config: dict | None = None  # the LoraConfig fields it was made from, as the user gave them
        self.ties: dict[str, str] = {}  # ensure_weight_tying: tied output layer key -> its embedding's key
        self.saved_ties: dict[str, str] = {}  # ensure_weight_tying: tied module path -> its saved embedding's path
        self.by_key: dict[str, LoraUnit] = {}
        self.child: dict[str, str] = {}  # key -> child name
        taken = {"saved", "tokens"}
        for unit in units:
            self.child[unit.key] = child_name(unit.key, taken, type(self))
            self.add_module(self.child[unit.key], unit)
            self.by_key[unit.key] = unit
        if saved:
            self.add_module("saved", Saved(saved))
        if tokens:
            self.add_module("tokens", Tokens(tokens))

    def saved_copies(self) -> dict[str, tuple[str, nn.Module]]:
        """Original module path -> (attribute path below the entry, trainable copy)."""
        box = getattr(self, "saved", None)
        if box is None:
            return {}
        return {path: (f"saved.{child}", box.get_submodule(child)) for path, child in box.paths.items()}

    def token_deltas(self) -> dict[str, tuple[str, TokenDelta]]:
        """Module path -> (attribute path below the entry, its trainable tokens)."""
        box = getattr(self, "tokens", None)
        if box is None:
            return {}
        return {path: (f"tokens.{child}", box.get_submodule(child)) for path, child in box.paths.items()}


class AdapterStore(nn.Module):
    """All adapters of a LoraModel. ``active`` lists the adapters the graph computes (the committed state's)."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []

    @property
    def bank(self):
        """The adapter bank (``bank.AdapterBank``) when adapters are routed per row, else None."""
        return self._modules.get(BANK)

    # ---- what a commit does (through a transaction) ----------------------------------------------------
    def hold(self, entries: Mapping[str, nn.Module], bank: nn.Module | None) -> None:
        """Make ``entries`` (in order) and ``bank`` the store's children, and nothing else."""
        self._modules.clear()
        for name, entry in entries.items():
            self.add_module(name, entry)
        if bank is not None:
            self.add_module(BANK, bank)

    def held(self) -> tuple[dict[str, nn.Module], nn.Module | None]:
        """What ``hold`` would put back: the entries in order and the bank."""
        return {n: self._modules[n] for n in self.names}, self.bank

    # ---- reading ------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [n for n in self._modules if n != BANK]

    def entry(self, name: str) -> AdapterEntry:
        if name not in self._modules or name == BANK:
            raise AdapterError(f"No adapter named {name!r}; adapters: {self.names}.")
        return self._modules[name]

    def units(self, name: str) -> Mapping[str, LoraUnit]:
        """key -> unit for adapter ``name`` (a read-only view)."""
        return MappingProxyType(self.entry(name).by_key)

    def unit(self, name: str, key: str) -> LoraUnit:
        units = self.entry(name).by_key
        if key not in units:
            raise AdapterError(f"Adapter {name!r} has no unit for key {key!r}.")
        return units[key]

    def iter_units(self) -> Iterator[tuple[str, LoraUnit]]:
        for name in self.names:
            for unit in self.entry(name).by_key.values():
                yield name, unit

    def saved(self, name: str) -> dict[str, tuple[str, nn.Module]]:
        """Original module path -> (attribute path below the store, trainable copy) for adapter ``name``."""
        return {path: (f"{name}.{rel}", m) for path, (rel, m) in self.entry(name).saved_copies().items()}


_RESERVED: set[str] = set()


def check_adapter_name(name: str) -> None:
    """An adapter name is an identifier of at most 100 characters that no attribute of the store uses (it is a
    submodule name and, for PEFT's layout, a directory name); ``__base__`` means "no adapter"."""
    if not _RESERVED:
        _RESERVED.update(dir(AdapterStore()), {BASE, BANK})
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 100 or name in _RESERVED:
        raise AdapterError(
            f"adapter_name {name!r} is not usable: use a Python identifier of at most 100 characters that is not "
            "an nn.Module attribute (e.g. 'default', 'task_a')."
        )


def adapter_dtype(base: torch.dtype, autocast: bool) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: fp16/bf16 base weights get float32 adapters."""
    return torch.float32 if autocast and base in (torch.float16, torch.bfloat16) else base


