"""The model's own calling convention: ``lm(...)`` takes any combination of keyword arguments the model's
``forward`` accepts, whatever example inputs the first capture used.

A call is bound to the model's ``forward`` signature (``capture.calls``). Each new call key is captured once,
lazily, with the call's own values as example inputs, then derived from the same adapter store and run over the
same ``Block`` objects as the first capture (``blocks.adopt_blocks``). So ``lm(input_ids=x, labels=y).loss`` is
the model's own loss (``-100`` ignored, ``num_items_in_batch`` honoured), at the cost of one capture per new
combination of arguments; an integer ``num_items_in_batch`` is passed as a tensor so that a new value does not
mean a new capture.

Example::

    cap = capture_call(lm.state.captured, {"input_ids": ids, "labels": ids}, index=1)
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

from .blocks import adopt_blocks
from .core import Captured, capture
from .modes import modes


def capture_call(first: Captured, call: dict[str, Any], index: int, module_path: str = "",
                 module: Any = None, training: bool | None = None) -> Captured:
    """Capture the model (or ``module``, its submodule at ``module_path``, keys then renamed to the model's) for a
    new call signature or mode (``training``; None: as it is), over the first capture's blocks (as their program
    ``call<index>``)."""
    module = module if module is not None else first.source
    with modes(module, training) if training is not None else contextlib.nullcontext():
        cap = capture(module, (), call)
    cap.program_key = f"call{index}"
    prefix = f"{module_path}." if module_path else ""
    cap.blocks = adopt_blocks(cap.graph_module, cap.graph, cap.blocks, cap.templates, first.blocks,
                              cap.program_key, module, prefix)
    if prefix:
        rekey(cap, "", prefix)
        cap.key_prefix = prefix
    return cap


def rekey(cap: Captured, old: str, new: str) -> Captured:
    """Rename the capture's target keys from prefix ``old`` to prefix ``new`` (the keys of the model the
    adapters were made for)."""
    cap.targets = [replace(t, key=new + t.key[len(old):]) if t.key.startswith(old) else t for t in cap.targets]
    return cap
