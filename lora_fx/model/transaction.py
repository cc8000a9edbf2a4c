"""Verbs as transactions: every change a verb makes to live objects goes through a ``Transaction`` that records its
undo, so an exception (``KeyboardInterrupt`` included) at any point rolls every applied change back in reverse
order; ``StateLock`` serialises verbs and lets calls run concurrently between them.

Example::

    with lock.write(), Transaction() as tx:     # rolled back if anything inside raises
        tx.copy_(weight, merged)
        tx.setattr(model, "state", new_state)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError

_MISSING = object()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """SIGINT (Ctrl-C) that arrives inside is delivered as KeyboardInterrupt at the end (main thread only)."""
    received: list[int] = []
    handler: Any = None
    if threading.current_thread() is threading.main_thread():
        try:
            handler = signal.signal(signal.SIGINT, lambda sig, frame: received.append(sig))
        except (ValueError, TypeError):  # no signal handling here (an embedded interpreter)
            handler = None
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    if received:
        raise KeyboardInterrupt


class Transaction:
    """Applies changes in order and remembers how to undo each; a context manager that rolls back on any exception
    and defers SIGINT (Ctrl-C) until it is done, so neither a commit nor its rollback is cut in half."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._deferred: Any = None

    def __enter__(self) -> Transaction:
        self._deferred = deferred_interrupts()
        self._deferred.__enter__()
        return self

    def __exit__(self, kind, value, tb) -> bool:
        try:
            if kind is not None:
                self.rollback()
        finally:
            self._deferred.__exit__(None, None, None)
        return False

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()

    # ---- changes ---------------------------------------------------------------------------------------------
    def call(self, do: Callable[[], Any], undo: Callable[[], Any]) -> None:
        """Run ``do``; ``undo`` puts back what it changes, and is safe to run however far ``do`` got (it restores
        values taken before ``do`` ran), so it is registered first."""
        self._undo.append(undo)
        do()

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name, _MISSING)

        def undo() -> None:
            if old is not _MISSING:
                setattr(obj, name, old)
            elif name in vars(obj):
                delattr(obj, name)
        self.call(lambda: setattr(obj, name, value), undo)

    def add_module(self, parent: nn.Module, name: str, module: nn.Module | None) -> None:
        """Register ``module`` as ``parent.<name>`` (None: remove the child)."""
        old = _child(parent, name)

        def put(m: Any) -> None:
            if m is _MISSING:
                if _child(parent, name) is not _MISSING:
                    delattr(parent, name)
            else:
                parent.register_module(name, m)
        self.call(lambda: put(_MISSING if module is None else module), lambda: put(old))

    def register_parameter(self, parent: nn.Module, name: str, param: nn.Parameter | None) -> None:
        """``parent.<name> = param`` as a parameter (None: remove it)."""
        old = dict(parent.named_parameters(recurse=False)).get(name, _MISSING)

        def put(p: Any) -> None:
            if p is _MISSING:
                if name in dict(parent.named_parameters(recurse=False)):
                    delattr(parent, name)
            else:
                parent.register_parameter(name, p)
        self.call(lambda: put(_MISSING if param is None else param), lambda: put(old))

    def copy_(self, tensor: torch.Tensor, value: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """``tensor.copy_(value)`` in place; ``old``: an exact copy of the current value the caller already holds
        (else one is taken)."""
        with torch.no_grad():
            saved = tensor.detach().clone() if old is None else old

            def do() -> None:
                with torch.no_grad():
                    tensor.copy_(value)

            def undo() -> None:
                with torch.no_grad():
                    tensor.copy_(saved)
        self.call(do, undo)

    def set_data(self, param: torch.Tensor, data: torch.Tensor) -> None:
        """Give ``param`` other storage (``param.data = data``), dropping a gradient of the old shape."""
        old, grad = param.data, param.grad

        def do() -> None:
            param.grad = None
            param.data = data

        def undo() -> None:
            param.data = old
            param.grad = grad
        self.call(do, undo)

    def requires_grad(self, param: torch.Tensor, flag: bool) -> None:
        old = param.requires_grad
        if old != flag:
            self.call(lambda: param.requires_grad_(flag), lambda: param.requires_grad_(old))


def _child(parent: nn.Module, name: str) -> Any:
    try:
        return parent.get_submodule(name)
    except AttributeError:
        return _MISSING


class Fresh:
    """A copied or unpickled model gets a fresh one of these (locks and caches belong to one live object)."""

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class SimpleLock(Fresh):
    """``threading.Lock`` that a deep copy of its owner can copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class _Read:
    __slots__ = ("lock",)

    def __init__(self, lock: StateLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire_read()

    def __exit__(self, *exc: Any) -> None:
        self.lock.release_read()


class StateLock(Fresh):
    """Readers (calls) run together; a writer (a verb) runs alone, after the readers it found finish, and readers
    that come while it waits queue behind it, then go before the next writer (neither side starves). Both are
    reentrant in their own thread; a thread that holds a read cannot start a verb (that would wait for itself)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting = 0  # writers waiting
        self._tickets = self._serving = 0
        self._abandoned: set[int] = set()
        self._waiting_readers = 0
        self._readers_turn = False  # a writer just left while readers waited: they go before the next writer
        self._local = threading.local()

    def holds_read(self) -> bool:
        """Whether this thread holds a read (it cannot take the write then)."""
        return bool(getattr(self._local, "reads", 0))

    def read(self) -> _Read:
        """Hold a read. Inside its own write a thread registers a read that outlives the write (a downgrade: enter
        the read, then leave the write), so no other verb can commit in between."""
        return _Read(self)

    def acquire_read(self) -> None:
        depth = getattr(self._local, "reads", 0)
        if depth:
            self._local.reads = depth + 1
            return
        with self._cond:
            if self._writer != threading.get_ident():
                self._waiting_readers += 1
                try:
                    while self._writer is not None or (self._waiting and not self._readers_turn):
                        self._cond.wait()
                finally:
                    self._waiting_readers -= 1
                    if not self._waiting_readers:
                        self._readers_turn = False
            self._readers += 1
        self._local.reads = 1

    def release_read(self) -> None:
        depth = self._local.reads
        self._local.reads = depth - 1
        if depth > 1:
            return
        with self._cond:  # no call between taking the lock and the count: Ctrl-C cannot land in between
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:
            self._writer_depth += 1
            try:
                yield
            finally:
                self._writer_depth -= 1
            return
        if getattr(self._local, "reads", 0):
            raise AdapterError("A LoraModel verb (set_adapter, merge, load_adapter, ...) was called while this thread "
                               "is inside a call of the same model (a forward hook? a streamer?); call it after the "
                               "forward or generate returns.")
        with self._cond:
            ticket, self._tickets = self._tickets, self._tickets + 1  # writers go in the order they came
            self._waiting += 1
            try:
                while (ticket != self._serving or self._writer is not None or self._readers
                       or (self._readers_turn and self._waiting_readers)):
                    self._cond.wait()
            except BaseException:
                self._abandoned.add(ticket)
                self._advance()
                raise
            finally:
                self._waiting -= 1
            self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with deferred_interrupts(), self._cond:
                self._writer = None
                self._serving += 1
                self._advance()
                self._readers_turn = self._waiting_readers > 0  # readers that queued behind it go next
                self._cond.notify_all()

    def _advance(self) -> None:
        """Skip the tickets of writers that gave up waiting."""
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()
