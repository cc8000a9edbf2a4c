"""Deployment: compile a (merged) module with good defaults, or export it as a ``.pt2`` program.

``compile``: for training, regional compilation: each group of identical blocks compiles its program once and
every block of the group reuses it, so compile time stops growing with depth; the module is compiled in place
and returned. This is the default for a module with blocks, in training mode, with trainable parameters (a
LoraModel after ``lm.train()``). Otherwise (inference, a merged graph, a module without blocks) the module goes
through ``torch.compile`` whole, which runs small batches faster (no Python between blocks); a LoraModel is
compiled in place there too: its graphs are compiled, not its Python wrapper, and several adapters are banked
first, so ``set_adapter``, routes and hot swaps do not recompile. Defaults:
``mode="max-autotune"`` when the parameters are on CUDA (Triton GEMM autotuning, plus CUDA graphs for a
whole-module compile: best steady-state latency, slower first compile) and the default mode on CPU (autotuning
buys little there and costs compile time). ``dynamic=None`` lets shapes that vary (batch, sequence) become
dynamic after the first recompile. Any keyword overrides these; ``regional=True`` / ``False`` chooses.

``export``: ``torch.export.export(strict=False)`` with ``Dim.AUTO`` on every tensor dimension, saved with
``torch.export.save`` through a temporary file. ``torch.export.load(path).module()`` runs it with no lora_fx.

Example::

    gm = lm.merge_and_unload()
    fast = lora_fx.compile(gm)
    lora_fx.export(gm, "model.pt2", example_inputs=(ids,))
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..capture import export_program
from ..capture.blocks import Block


def compile(module: nn.Module, *, regional: bool | None = None, **torch_compile_kwargs: Any) -> nn.Module:  # noqa: A001
    """``torch.compile`` with lora_fx's defaults (see the module docstring); kwargs override them."""
    on_cuda = any(p.is_cuda for p in module.parameters())
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    if regional is None:
        regional = module.training and any(p.requires_grad for p in module.parameters())
    options: dict[str, Any] = {"dynamic": None}
    if on_cuda:  # CUDA graphs pay off for a whole graph; blocks share a program but not their weights
        options["mode"] = "max-autotune-no-cudagraphs" if blocks and regional else "max-autotune"
    options.update(torch_compile_kwargs)
    configure = getattr(module, "configure", None)
    if callable(configure):  # a LoraModel: its generate() compiles the decode step likewise
        configure(compile_options={k: v for k, v in options.items() if k != "dynamic"})
    if blocks and regional:
        for block in blocks:
            block.set_compile(options)
        return module
    if callable(configure) and hasattr(module, "build_adapter_bank"):
        _bank_for_serving(module)
        configure(graph_compile=options)  # its graphs compiled, not its Python: adapter switches do not recompile
        return module
    return torch.compile(module, **options)


def _bank_for_serving(lm: Any) -> None:
    """A LoraModel with several adapters gets an adapter bank, so switching between them (``set_adapter``, a route
    per row, a hot swap) changes tensors, not graphs (a bank's refusal leaves the model as it is)."""
    from ..model.verbs import serving_bank

    if serving_bank(replace(lm.state, options=replace(lm.state.options, graph_compile={}))):
        lm.build_adapter_bank()


def export(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """Export ``module`` (typically ``lm.merge_and_unload()``) to ``path`` as a torch.export program."""
    program = export_program(module, tuple(example_inputs), example_kwargs or {})
    atomic_write(Path(path), lambda tmp: torch.export.save(program, tmp))
    return program
