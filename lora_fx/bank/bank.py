"""The adapter bank: every adapter of each target stacked, padded to one maximum rank, read by routed graphs.

For a target with adapters ``a_0 .. a_{S-1}`` the bank holds (slot ``S`` is ``"__base__"``: zeros)::

    A[S+1, R, ...]   B[S+1, out, R, ...]   scales[S+1]   (s_i = alpha_i / r_i, 0 for a missing key and the base)

Rank ``r_i <= R`` fills the first ``r_i`` rows of ``A[i]`` (columns of ``B[i]``); the rest stays zero, so the
padded product ``B[i] A[i]`` is adapter i's own ``B A``. Each unit's ``lora_A`` / ``lora_B`` *is* a view of its
slot (the same Parameter objects, their storage moved into the bank): an optimiser step, ``load_state_dict`` or
a hot swap writes the bank in place, so graphs, compiled code and CUDA graphs stay valid. The route (the slot of
each batch row, or one slot for the whole batch) is an input of every call; a routed graph never changes when the
route, a scaling or a weight does, so neither ``set_adapter`` nor a hot swap recompiles.

Everything here is built aside (``plan_bank``) and made live by a verb's transaction (``link``).

Example::

    bank, links = plan_bank(entries, max_rank=16)
    route = bank.route(["a", "b", "__base__", "a"])       # row i uses adapter names[i]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters.store import BANK, BASE
from ..adapters.unit import device_memory
from ..errors import AdapterError
from ..passes.common import ident

__all__ = ["BANK", "BASE", "AdapterBank", "RowDropout", "bank_refusal", "plan_bank", "own_storage"]


class RowDropout(nn.Module):
    """LoRA dropout with each row's own adapter's probability: ``x * mask / (1 - p_row)`` in training."""

    def __init__(self, p: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("p", p, persistent=False)
        self.any = bool((p > 0).any())

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.any:
            return x
        p = self.p.index_select(0, route).to(x.dtype)
        p = p.view(-1, *([1] * (x.dim() - 1))) if route.numel() > 1 else p
        keep = (torch.rand_like(x) >= p).to(x.dtype)
        return x * keep / (1 - p)


class AdapterBank(nn.Module):
    """Stacked adapters per target key (buffers ``<stem>__A``, ``__B``, ``__scales``), per-row dropouts and the
    default route (the active adapter's slot). ``slots`` lists the adapters in slot order; ``max_rank`` is R."""

    def __init__(self, slots: list[str], max_rank: int) -> None:
        super().__init__()
        self.slots, self.max_rank = list(slots), max_rank
        self.stems: dict[str, str] = {}  # key -> buffer stem
        self.dropouts = nn.ModuleDict()
        self.register_buffer("default_route", torch.full((1,), len(slots), dtype=torch.long), persistent=False)

    @property
    def base(self) -> int:
        return len(self.slots)

    def attr(self, key: str, what: str) -> str:
        """Buffer name of ``what`` (``A``, ``B``, ``scales``) for ``key``."""
        return f"{self.stems[key]}__{what}"

    def tensor(self, key: str, what: str) -> torch.Tensor:
        return getattr(self, self.attr(key, what))

    def slot_of(self, name: str) -> int:
        if name == BASE:
            return self.base
        if name not in self.slots:
            raise AdapterError(f"adapter_names names {name!r}, which is not in the adapter bank; adapters: "
                               f"{self.slots} (or '{BASE}' for none).")
        return self.slots.index(name)

    def route(self, names: Iterable[str] | str, device: torch.device | None = None) -> torch.Tensor:
        """The route of one call: a list (one name per row) or one name for every row."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise AdapterError("adapter_names is empty; pass one adapter name per row of the batch.")
        ids = [self.slot_of(n) for n in names]
        return torch.tensor(ids, dtype=torch.long, device=device or self.default_route.device)

    def linked(self, entries: Mapping[str, Any]) -> bool:
        """Whether every unit still is a view of its slot (a ``.to()`` or ``load_state_dict(assign=True)`` may
        have given it storage of its own)."""
        for key, stem in self.stems.items():
            a_bank = getattr(self, f"{stem}__A")
            for i, name in enumerate(self.slots):
                unit = entries[name].by_key.get(key) if name in entries else None
                if unit is not None and unit.lora_A.data_ptr() != a_bank[i].data_ptr():
                    return False
        return True

    def settings(self, entries: Mapping[str, Any], overrides: Mapping[Any, tuple] | None = None) -> list:
        """``(buffer, value)`` pairs that bring scalings and dropout probabilities in line with the units
        (``overrides``: unit -> (scaling, dropout p) a hot swap will give it)."""
        out = []
        for key, stem in self.stems.items():
            units = [entries[name].by_key.get(key) for name in self.slots]

            def of(u, i):
                return (overrides or {}).get(u, (u.scaling, u.dropout_p))[i] if u is not None else 0.0
            scales = self.tensor(key, "scales")
            out.append((scales, torch.tensor([of(u, 0) for u in units] + [0.0], dtype=scales.dtype)))
            out.append((self.dropouts[stem].p, torch.tensor([of(u, 1) for u in units] + [0.0])))
        return out


def bank_refusal(entries: Mapping[str, Any]) -> str | None:
    """Why these adapters cannot share a bank (None: they can)."""
    for name, entry in entries.items():
        if entry.saved_copies() or entry.token_deltas() or entry.bias != "none":
            return (f"adapter {name!r} trains base modules (modules_to_save, trainable tokens or bias="
                    f"{entry.bias!r}), which every row would share; routed adapters must be LoRA weights only")
        for unit in entry.by_key.values():
            if not unit.variant.routable:
                return (f"adapter {name!r} uses {unit.variant.label} on {unit.key!r}, which the bank does not "
                        "route; merge or drop it first")
            why = unit.strategy.refusal(unit.geometry, "routing rows to it")
            if why:
                return f"adapter {name!r} targets {unit.key!r}, {why}"
            if getattr(unit.geometry, "left", False):
                return (f"adapter {name!r} targets {unit.key!r}, whose weight is the left operand of a matmul "
                        "(W @ x); the bank routes rows of x @ W forms only")
    return None


@torch.no_grad()
def _check_size(keys: Mapping[str, list], rank: int, slots: int, asked: Any) -> None:
    """Refuse a bank larger than its device's memory before asking the allocator (``max_rank=10**9``)."""
    need, device = 0, None
    for units in keys.values():
        unit = next(u for u in units if u is not None)
        shape_a, shape_b = unit.strategy.shapes(unit.geometry, rank)
        need += slots * (math.prod(shape_a) + math.prod(shape_b)) * unit.lora_A.element_size()
        device = unit.lora_A.device
    if device is not None and need > device_memory(device):
        raise AdapterError(f"max_rank={asked!r}: the bank would stack {slots} slots of rank {rank} on "
                           f"{len(keys)} targets, {need / 2**30:.1f} GiB, more than this {device.type} device has "
                           "free; use a max_rank near the adapters' ranks.")


def plan_bank(entries: Mapping[str, Any], max_rank: int | None = None,
              default: str | None = None) -> tuple[AdapterBank, list[tuple[nn.Parameter, torch.Tensor]]]:
    """A new bank stacking ``entries`` (every adapter, in order) and the ``(parameter, view of its slot)`` links a
    transaction makes live; nothing live changes here. ``max_rank``: the padded rank R (default: the largest rank);
    hot swaps take any rank up to it. ``default``: the adapter of the default route (None: the base)."""
    names = list(entries)
    if not names:
        raise AdapterError("There is no adapter to bank; add or load one first.")
    why = bank_refusal(entries)
    if why:
        raise AdapterError(f"Cannot build an adapter bank: {why}.")
    largest = max(u.r for e in entries.values() for u in e.by_key.values())
    rank = largest if max_rank is None else max_rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < largest:
        raise AdapterError(f"max_rank={max_rank!r} is below the largest adapter rank in the store ({largest}); "
                           f"pass max_rank >= {largest}.")
    keys: dict[str, list] = {}
    for i, name in enumerate(names):
        for key, unit in entries[name].by_key.items():
            keys.setdefault(key, [None] * len(names))[i] = unit
    for key, units in keys.items():
        dtypes = {u.lora_A.dtype for u in units if u is not None}
        if len(dtypes) > 1:
            raise AdapterError(f"The adapters on {key!r} have different dtypes {sorted(map(str, dtypes))}; the bank "
                               "stacks one dtype per target: cast them to one dtype (lm.to(dtype)) first.")
    _check_size(keys, rank, len(names) + 1, max_rank)
    bank = AdapterBank(names, rank)
    if default is not None:
        bank.default_route.fill_(bank.slot_of(default))
    links: list[tuple[nn.Parameter, torch.Tensor]] = []
    taken: set[str] = set()
    for key, units in keys.items():
        stem = ident(key)
        while stem in taken:
            stem += "_"
        taken.add(stem)
        bank.stems[key] = stem
        links += _stack(bank, stem, units, rank)
    for buffer, value in bank.settings(entries):
        buffer.copy_(value)
    for drop in bank.dropouts.values():
        drop.any = bool((drop.p > 0).any())
    return bank, links


def _stack(bank: AdapterBank, stem: str, units: list, rank: int) -> list:
    first = next(u for u in units if u is not None)
    shape_a, shape_b = first.strategy.shapes(first.geometry, rank)
    like = first.lora_A
    a_bank = torch.zeros(len(units) + 1, *shape_a, dtype=like.dtype, device=like.device)
    b_bank = torch.zeros(len(units) + 1, *shape_b, dtype=like.dtype, device=like.device)
    links = []
    for i, unit in enumerate(units):
        if unit is None:
            continue
        a_bank[i, :unit.r] = unit.lora_A[:unit.r]
        b_bank[i, :, :unit.r] = unit.lora_B[:, :unit.r]
        links += [(unit.lora_A, a_bank[i]), (unit.lora_B, b_bank[i])]
    bank.register_buffer(f"{stem}__A", a_bank, persistent=False)
    bank.register_buffer(f"{stem}__B", b_bank, persistent=False)
    bank.register_buffer(f"{stem}__scales", torch.zeros(len(units) + 1, dtype=like.dtype, device=like.device),
                         persistent=False)
    bank.dropouts[stem] = RowDropout(torch.zeros(len(units) + 1, device=like.device))
    return links


@torch.no_grad()
def own_storage(entries: Mapping[str, Any]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, its own storage at the unit's true rank)`` for every unit: what removing a bank links."""
    return [(p, v) for e in entries.values() for u in e.by_key.values()
            for p, v in ((u.lora_A, u.lora_A[:u.r].clone()), (u.lora_B, u.lora_B[:, :u.r].clone()))]
