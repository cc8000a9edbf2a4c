"""The adapter bank: every adapter of each target stacked, padded to one maximum rank, read by routed graphs.

For a target with adapters ``a_0 .. a_{S-1}`` the bank holds (slot ``S`` is ``"__base__"``: zeros)::

    A[S+1, R, ...]   B[S+1, out, R, ...]   scales[S+1]   (s_i = alpha_i / r_i, 0 for a missing key and the base)

Rank ``r_i <= R`` fills the first ``r_i`` rows of ``A[i]`` (columns of ``B[i]``); the rest stays zero, so the
padded product ``B[i] A[i]`` is adapter i's own ``B A``. Each unit's ``lora_A`` / ``lora_B`` *is* a view of its
slot (the same Parameter objects, their storage moved into the bank): an optimiser step, ``load_state_dict`` or
a hot swap writes the bank in place, so graphs, compiled code and CUDA graphs stay valid. ``route`` (the slot of
each batch row, or one slot for the whole batch) is set before each call; a routed graph never changes when the
route, a scaling or a weight does, so neither ``set_adapter`` nor a hot swap recompiles.

Example::

    bank = build_bank(lm.adapters, max_rank=16)
    bank.set_route(["a", "b", "__base__", "a"])       # row i uses adapter names[i]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import AdapterError
from .passes.common import ident
from .store import BANK

BASE = "__base__"
__all__ = ["BANK", "BASE", "AdapterBank", "build_bank", "unbank"]


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
    """Stacked adapters per target key (buffers ``<key>__A``, ``__B``, ``__scales``), the route, and per-row
    dropouts. ``slots`` lists the adapters in slot order; ``max_rank`` is R."""

    def __init__(self, slots: list[str], max_rank: int) -> None:
        super().__init__()
        self.slots, self.max_rank = list(slots), max_rank
        self.stems: dict[str, str] = {}  # key -> buffer stem
        self.dropouts = nn.ModuleDict()
        self.register_buffer("route", torch.full((1,), len(slots), dtype=torch.long), persistent=False)

    @property
    def base(self) -> int:
        return len(self.slots)

    def attr(self, key: str, what: str) -> str:
        """Buffer name of ``what`` (``A``, ``B``, ``scales``) for ``key``; the route for ``key=""``."""
        return "route" if what == "route" else f"{self.stems[key]}__{what}"

    def tensor(self, key: str, what: str) -> torch.Tensor:
        return getattr(self, self.attr(key, what))

    def dropout_path(self, key: str) -> str:
        return f"dropouts.{self.stems[key]}"

    def slot_of(self, name: str) -> int:
        if name == BASE:
            return self.base
        if name not in self.slots:
            raise AdapterError(f"adapter_names names {name!r}, which is not in the adapter bank; adapters: "
                               f"{self.slots} (or '{BASE}' for none).")
        return self.slots.index(name)

    def set_route(self, names: Iterable[str] | str, device: torch.device | None = None) -> None:
        """Route rows to adapters: a list (one name per row) or one name for every row."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise AdapterError("adapter_names is empty; pass one adapter name per row of the batch.")
        ids = [self.slot_of(n) for n in names]
        self.route = torch.tensor(ids, dtype=torch.long, device=device or self.route.device)

    def linked(self, store) -> bool:
        """Whether every unit still is a view of its slot (a ``.to()`` or ``load_state_dict(assign=True)`` may
        have given it storage of its own)."""
        for key, stem in self.stems.items():
            a_bank = getattr(self, f"{stem}__A")
            for i, name in enumerate(self.slots):
                unit = store.entry(name).by_key.get(key)
                if unit is not None and unit.lora_A.data_ptr() != a_bank[i].data_ptr():
                    return False
        return True

    @torch.no_grad()
    def sync(self, store) -> None:
        """Scalings and dropout probabilities from the units (after a hot swap), in place."""
        for key in self.stems:
            units = [store.entry(name).by_key.get(key) for name in self.slots]
            scales = self.tensor(key, "scales")
            scales.copy_(torch.tensor([u.scaling if u is not None else 0.0 for u in units] + [0.0],
                                      dtype=scales.dtype))
            drop = self.dropouts[self.stems[key]]
            drop.p.copy_(torch.tensor([u.dropout_p if u is not None else 0.0 for u in units] + [0.0]))
            drop.any = bool((drop.p > 0).any())


def bank_refusal(store, names: list[str]) -> str | None:
    """Why these adapters cannot share a bank (None: they can)."""
    for name in names:
        entry = store.entry(name)
        if getattr(entry, "saved", None) is not None or entry.bias != "none":
            return (f"adapter {name!r} trains base modules (modules_to_save or bias={entry.bias!r}), which every "
                    "row would share; routed adapters must be LoRA weights only")
        for unit in entry.by_key.values():
            if unit.slices:
                return (f"adapter {name!r} has output slices on {unit.key!r}, which the bank does not route; "
                        "merge or drop it first")
            if getattr(unit.geometry, "left", False):
                return (f"adapter {name!r} targets {unit.key!r}, whose weight is the left operand of a matmul "
                        "(W @ x); the bank routes rows of x @ W forms only")
            if unit.use_dora or unit.lora_bias:
                return (f"adapter {name!r} uses {'DoRA' if unit.use_dora else 'lora_bias'} on {unit.key!r}, which "
                        "the bank does not route; merge or drop it first")
    return None


@torch.no_grad()
def build_bank(store, max_rank: int | None = None) -> AdapterBank:
    """Stack the store's adapters (all of them, in store order) into a new bank and make every unit a view of its
    slot. ``max_rank``: the padded rank R (default: the largest rank in the store); hot swaps take any rank up
    to it. Refuses adapters the bank cannot route (DoRA, lora_bias, modules_to_save, trained biases)."""
    names = store.names
    if not names:
        raise AdapterError("There is no adapter to bank; add or load one first.")
    why = bank_refusal(store, names)
    if why:
        raise AdapterError(f"Cannot build an adapter bank: {why}.")
    largest = max(u.r for _, u in store.iter_units())
    rank = largest if max_rank is None else max_rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < largest:
        raise AdapterError(f"max_rank={max_rank!r} is below the largest adapter rank in the store ({largest}); "
                           f"pass max_rank >= {largest}.")
    bank = AdapterBank(names, rank)
    keys: dict[str, list] = {}
    for name in names:
        for key, unit in store.entry(name).by_key.items():
            keys.setdefault(key, [None] * len(names))[names.index(name)] = unit
    for key, units in keys.items():  # check everything before any unit changes
        dtypes = {u.lora_A.dtype for u in units if u is not None}
        if len(dtypes) > 1:
            raise AdapterError(f"The adapters on {key!r} have different dtypes {sorted(map(str, dtypes))}; the bank "
                               "stacks one dtype per target: cast them to one dtype (lm.to(dtype)) first.")
    taken: set[str] = set()
    for key, units in keys.items():
        stem = ident(key)
        while stem in taken:
            stem += "_"
        taken.add(stem)
        bank.stems[key] = stem
        _stack(bank, stem, units, rank)
    bank.sync(store)
    return bank


def _stack(bank: AdapterBank, stem: str, units: list, rank: int) -> None:
    first = next(u for u in units if u is not None)
    shape_a, shape_b = first.strategy.shapes(first.geometry, rank)
    like = first.lora_A
    a_bank = torch.zeros(len(units) + 1, *shape_a, dtype=like.dtype, device=like.device)
    b_bank = torch.zeros(len(units) + 1, *shape_b, dtype=like.dtype, device=like.device)
    for i, unit in enumerate(units):
        if unit is None:
            continue
        a_bank[i, :unit.r] = unit.lora_A[:unit.r]
        b_bank[i, :, :unit.r] = unit.lora_B[:, :unit.r]
        for p, view in ((unit.lora_A, a_bank[i]), (unit.lora_B, b_bank[i])):
            p.grad = None  # a gradient of the old shape
            p.data = view
        unit.routed = True
    bank.register_buffer(f"{stem}__A", a_bank, persistent=False)
    bank.register_buffer(f"{stem}__B", b_bank, persistent=False)
    bank.register_buffer(f"{stem}__scales", torch.zeros(len(units) + 1, dtype=like.dtype, device=like.device),
                         persistent=False)
    bank.dropouts[stem] = RowDropout(torch.zeros(len(units) + 1, device=like.device))


@torch.no_grad()
def unbank(store) -> None:
    """Give every unit storage of its own at its true rank (the bank is then dropped by the caller)."""
    for _, unit in store.iter_units():
        unit.lora_A.grad = unit.lora_B.grad = None
        unit.lora_A.data = unit.lora_A[:unit.r].clone()
        unit.lora_B.data = unit.lora_B[:, :unit.r].clone()
        unit.routed = False
