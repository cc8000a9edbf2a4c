"""Fault injection for the transaction tests: raise at the N-th call of a lora_fx function while a verb runs.

``sys.settrace`` sees every Python call in this thread; the tracer counts calls of functions defined in lora_fx
(the transaction and lock machinery excepted: it is what runs the rollback) and raises at the chosen one, the
way a failing allocation, a bad value or a KeyboardInterrupt would surface there.
"""

from __future__ import annotations

import os
import sys

import lora_fx

PACKAGE = os.path.dirname(lora_fx.__file__)
MACHINERY = os.path.join(PACKAGE, "model", "transaction.py")


class Injected(Exception):
    pass


class InjectedInterrupt(KeyboardInterrupt):
    pass


def _ours(frame) -> bool:
    """A lora_fx function's frame (not the machinery's; not a generator expression's, whose cleanup swallows
    exceptions)."""
    name = frame.f_code.co_filename
    return name.startswith(PACKAGE) and name != MACHINERY and frame.f_code.co_name != "<genexpr>"


def calls(fn) -> list:
    """The code objects of the lora_fx calls ``fn()`` makes, in order."""
    seen = []

    def tracer(frame, event, arg):
        if event == "call" and _ours(frame):
            seen.append(frame.f_code)
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return seen


def fault_at(n: int, fn, exc: type[BaseException] = Injected) -> bool:
    """Run ``fn()`` raising ``exc`` at its ``n``-th lora_fx call (1-based); True when the fault fired (whatever
    ``fn`` raised then: a pass wraps what it cannot handle in a PassError)."""
    count = [0]

    def tracer(frame, event, arg):
        if event == "call" and _ours(frame):
            count[0] += 1
            if count[0] == n:
                raise exc(f"fault at call {n} ({frame.f_code.co_name} in {os.path.basename(frame.f_code.co_filename)})")
        return None

    sys.settrace(tracer)
    try:
        fn()
    except BaseException:
        if count[0] < n:
            raise
        return True
    finally:
        sys.settrace(None)
    return False


def points(codes: list, extra: int = 12) -> list[int]:
    """Fault points: the first call of each distinct function, plus ``extra`` evenly spaced calls."""
    first, seen = [], set()
    for i, code in enumerate(codes, 1):
        if code not in seen:
            seen.add(code)
            first.append(i)
    step = max(1, len(codes) // extra)
    return sorted(set(first) | set(range(1, len(codes) + 1, step)))
