"""Capture a model as a torch.fx GraphModule that shares the model's Parameter objects.

- no example inputs: ``torch.fx.symbolic_trace(model)``;
- example inputs/kwargs: ``torch.export.export(model, args, kwargs, strict=False).module()`` with
  ``Dim.AUTO`` on every dimension of every tensor input (a new batch size or length still runs);
- a GraphModule is taken as it is.

Example::

    cap = capture(model, example_inputs=(ids,))   # cap.graph_module, cap.source, cap.method
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from .errors import CaptureError


@dataclass
class Captured:
    graph_module: torch.fx.GraphModule
    source: nn.Module  # the model captured (module types and paths are read from it)
    method: str  # "symbolic_trace" | "export" | "graph_module"
    mode_fixed: bool  # True when the graph's own train()/eval() cannot be switched (exported graphs)


def capture(
    model: nn.Module, example_inputs: tuple = (), example_kwargs: dict[str, Any] | None = None
) -> Captured:
    """Capture ``model``; see the module docstring for which path is taken."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"lorafy expects a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if isinstance(model, torch.fx.GraphModule) and not example_inputs and not example_kwargs:
        return Captured(model, model, "graph_module", _mode_fixed(model))
    if example_inputs or example_kwargs:
        gm = _export(model, example_inputs, example_kwargs or {})
        return Captured(gm, model, "export", True)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise CaptureError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__} ({type(e).__name__}: {e}). "
            "Pass example_inputs=(...) and/or example_kwargs={...} to lorafy so the model is captured "
            "with torch.export instead."
        ) from e
    return Captured(gm, model, "symbolic_trace", False)


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    if model.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        warnings.warn(
            f"{type(model).__name__} is in training mode: torch.export fixes the base graph's mode at capture, so "
            "its dropout stays active in the graph (lm.eval() switches only LoRA's dropout). Call model.eval() "
            "before lorafy for a deterministic base.", stacklevel=4)
    gm = export_program(model, args, kwargs).module()
    _share_parameters(gm, model)
    return gm


def export_program(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` with ``Dim.AUTO`` on every tensor dimension; CaptureError on failure."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {e}.") from None
    dynamic = {name: _auto_dims(value) for name, value in bound.items()}
    try:
        with _no_kv_cache(model, kwargs):
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    except Exception as e:
        raise CaptureError(
            f"torch.export.export(strict=False) could not capture {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check that the example inputs "
            "run the model as-is (model(*example_inputs, **example_kwargs)), or pass a model that "
            "torch.fx.symbolic_trace can trace with no example inputs."
        ) from e
    return ep


def _auto_dims(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {i: Dim.AUTO for i in range(value.dim())} if value.dim() else None
    if isinstance(value, (list, tuple)):
        return type(value)(_auto_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    return None


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module, kwargs: dict[str, Any]):
    """Hugging Face models return a KV-cache object export cannot flatten; capture without it."""
    config = getattr(model, "config", None)
    if config is None or "use_cache" in kwargs or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _share_parameters(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Point the graph at the model's own Parameter objects (export may hand back copies)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        original = own.get(name)
        if original is not None and original is not param and original.shape == param.shape:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            setattr(owner, attr, original)


def _mode_fixed(gm: torch.fx.GraphModule) -> bool:
    try:
        gm.train(gm.training)
    except NotImplementedError:
        return True
    return False
