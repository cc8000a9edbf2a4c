"""The one cache of derived graphs besides the training graph: a capture of the same model for another call
signature, or generation's prefill and decode steps, each derived on demand from the LoraModel's state and
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
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from .transaction import Fresh, SimpleLock


@dataclass
class Entry:
    """Captures derived together (generation's prefill and decode share a KV cache and a state version)."""

    caps: tuple[Any, ...]  # capture.Captured
    key: Hashable = None
    prefix: str = ""  # where the model sits in these captures (saved-module paths are renamed)
    strip: str = ""  # where their root sits in the model
    version: int = -1  # the state's ``derived`` version they follow (-1: never derived)
    extra: dict[str, Any] = field(default_factory=dict)  # what belongs to this derivation (compiled steps)
    records: list = field(default_factory=list)  # the passes' records of the last derivation
    lock: Any = field(default_factory=SimpleLock)  # held by a user of state the captures keep (a KV cache)

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
