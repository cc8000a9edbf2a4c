"""The one cache of derived graphs besides the training graph: a capture of the same model for another call
signature, or generation's prefill and decode steps, each derived on demand from the LoraModel's state and
stamped with the version it was derived from (``LoraModel.derived``).

Example::

    entry = lm.derived(("call", key), lambda: capture_call(...))
    entry.cap.graph_module(...), entry.version == lm.state.derived
"""

from __future__ import annotations

import threading
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


class GraphCache(Fresh):
    """Entries by key; ``put`` keeps the first entry stored for a key (two threads capturing the same call)."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, Entry] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Entry | None:
        return self._entries.get(key)

    def put(self, key: Hashable, entry: Entry) -> Entry:
        with self._lock:
            return self._entries.setdefault(key, entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
