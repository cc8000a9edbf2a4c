"""The one cache of derived graphs besides the training graph: a capture of the same model for another call
signature, or generation's cached step, each derived on demand from the LoraModel's state and
stamped with the version it was derived from (``LoraModel.derived``).

The cache keeps at most ``capacity`` entries (``LORA_FX_GRAPH_CACHE``, default 32) and evicts the least recently
used; a capture that failed is remembered (its error raised again, not retried) for the same number of keys.

Example::

    entry = lm.derived(("call", key), lambda: capture_call(...))
    entry.cap.graph_module(...), entry.version == lm.state.derived
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ..capture import Captured
from ..capture.blocks import Block
from ..errors import AdapterError, LoraFxError
from ..passes import build, install
from ..passes.fold import HOLDER
from .transaction import Fresh, Transaction


@dataclass
class Entry:
    """Captures derived together for one state version (a call signature's graph, generation's cached step)."""

    caps: tuple[Any, ...]  # capture.Captured
    key: Hashable = None
    prefix: str = ""  # where the model sits in these captures (saved-module paths are renamed)
    strip: str = ""  # where their root sits in the model
    version: int = -1  # the state's ``derived`` version they follow (-1: never derived)
    extra: dict[str, Any] = field(default_factory=dict)  # what belongs to this derivation (compiled steps)
    records: list = field(default_factory=list)  # the passes' records of the last derivation

    @property
    def cap(self) -> Any:
        return self.caps[0]


def default_capacity() -> int:
    try:
        return max(1, int(os.environ.get("LORA_FX_GRAPH_CACHE", "32")))
    except ValueError:
        return 32


class GraphCache(Fresh):
    """Entries by key, least recently used first; ``put`` keeps the first entry stored for a key (two threads
    capturing the same call) and returns it with the entries it evicted beyond ``capacity``."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity or default_capacity()
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._failed: OrderedDict[Hashable, Exception] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: Entry) -> tuple[Entry, list[Entry]]:
        with self._lock:
            kept = self._entries.setdefault(key, entry)
            self._entries.move_to_end(key)
            evicted = []
            while len(self._entries) > self.capacity:
                evicted.append(self._entries.popitem(last=False)[1])
            return kept, evicted

    def evict_oldest(self) -> list[Entry]:
        with self._lock:
            return [self._entries.popitem(last=False)[1]] if self._entries else []

    def failure(self, key: Hashable) -> Exception | None:
        return self._failed.get(key)

    def fail(self, key: Hashable, error: Exception) -> None:
        with self._lock:
            self._failed[key] = error
            while len(self._failed) > self.capacity:
                self._failed.popitem(last=False)

    def clear(self) -> list[Entry]:
        with self._lock:
            gone = list(self._entries.values())
            self._entries.clear()
            self._failed.clear()
            return gone

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class DerivedGraphsMixin:
    """The LoraModel's side of the cache: entries made on demand, derived for the committed state, evicted."""

    def derived(self, key: Hashable, capture: Callable[[], Captured | tuple[Captured, ...]], *, prefix: str = "",
                strip: str = "") -> Entry:
        """The capture(s) stored under ``key`` (made by ``capture()`` the first time), derived for the committed
        state: the seam through which other call signatures and generation get their graphs. ``prefix`` / ``strip``:
        where the model sits in those captures / where their root sits in the model."""
        entry = self._graphs.get(key)
        if entry is None:
            failed = self._graphs.failure(key)
            if failed is not None:  # a call that cannot be captured is not captured again on every call
                raise type(failed)(f"{failed} (as on the first attempt for this call; not captured again)")
            try:
                caps = capture()
            except LoraFxError as e:
                self._graphs.fail(key, e)
                raise
            entry, evicted = self._graphs.put(key, Entry(caps if isinstance(caps, tuple) else (caps,), key, prefix,
                                                         strip))
            self._retire(evicted)
        return self.update_entry(entry)

    def _retire(self, entries: list[Entry]) -> None:
        """Drop evicted entries' block programs; a call still holding one derives it again before it runs."""
        if not entries or self._lock.holds_read():  # (inside a call: other calls may run them; dropped later)
            return
        with self._lock.write():
            for entry in entries:
                entry.version = -1
                for cap in entry.caps:
                    key = getattr(cap, "program_key", "")
                    for block in (cap.blocks or {}).values() if key else ():
                        if isinstance(block, Block):
                            block.set_program(None, key)

    def update_entry(self, entry: Entry) -> Entry:
        """Derive ``entry``'s captures again if a verb committed since they were derived."""
        if entry.version != self._state.derived:
            with self._lock.write():
                self._derive_entry(entry)
        return entry

    def _derive_entry(self, entry: Entry) -> None:
        state = self._state
        if entry.version == state.derived:
            return
        plan = state.plan(prefix=entry.prefix, strip=entry.strip)
        derived = [build(cap, plan) for cap in entry.caps]
        attach = {state.store_name: state.store}
        if hasattr(self.graph_module, HOLDER):
            attach[HOLDER] = getattr(self.graph_module, HOLDER)
        with Transaction() as tx:
            for d in derived:
                install(d, tx, attach)
            tx.setattr(entry, "extra", {})
            tx.setattr(entry, "records", [r for d in derived for r in d.records])
            tx.setattr(entry, "version", state.derived)

    @property
    def derived_keys(self) -> list[Hashable]:
        """The keys of the derived graph sets kept now (least recently used first; reading them uses none)."""
        return self._graphs.keys()

    @property
    def derived_graphs(self) -> dict[Hashable, tuple[Captured, ...]]:
        """The captures besides the training graph's, by key (other call signatures, generation sizes)."""
        return {k: self._graphs.get(k).caps for k in self._graphs.keys()}

    @property
    def graph_cache_size(self) -> int:
        """How many derived graph sets (other call signatures, generation sizes) are kept, least recently used
        evicted first (default 32, or ``LORA_FX_GRAPH_CACHE``)."""
        return self._graphs.capacity

    @graph_cache_size.setter
    def graph_cache_size(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise AdapterError(f"graph_cache_size={size!r}: use a positive integer.")
        self._graphs.capacity = size
        while len(self._graphs) > size:
            self._retire(self._graphs.evict_oldest())

    def forget_graphs(self) -> None:
        """Drop every derived graph besides the training graph (they are captured again on demand)."""
        self._retire(self._graphs.clear())
