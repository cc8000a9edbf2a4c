"""torch.export with lora_fx's defaults: ``strict=False``, ``Dim.AUTO`` on every dimension of every tensor input
(a new batch size or length still runs), the KV cache off, and the graph pointed at the model's own Parameters.

Example::

    gm = export_program(model, (ids,), {}).module()
    share_parameters(gm, model)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..errors import CaptureError
from .experts import traceable_experts


def export_program(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                   dims: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` with ``Dim.AUTO`` on every tensor dimension, or, for the arguments
    ``dims`` names, its dynamic shapes (``Dim("batch", min=1)``: a range that takes in size 1 too); CaptureError on
    failure."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {e}.") from None
    try:
        with no_kv_cache(model, kwargs), _quiet_specialisation(), traceable_experts(model), \
                _explicit_keywords(model, bound) as bound:
            dynamic = {name: (dims or {}).get(name, _auto_dims(value)) for name, value in bound.items()}
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    except Exception as e:
        raise CaptureError(
            f"torch.export.export(strict=False) could not capture {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check that the example inputs "
            "run the model as-is (model(*example_inputs, **example_kwargs)), or pass a model that "
            "torch.fx.symbolic_trace can trace with no example inputs."
        ) from e
    return ep


@contextlib.contextmanager
def _explicit_keywords(model: nn.Module, bound: dict[str, Any]):
    """Values passed through ``**kwargs`` (``num_items_in_batch``) become named parameters of ``model.forward``
    while exporting: export cannot give them dynamic shapes otherwise. Yields the arguments by name."""
    signature = inspect.signature(model.forward)
    var_kw = next((p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if var_kw is None or not bound.get(var_kw.name):
        yield bound
        return
    extra = bound[var_kw.name]
    original = model.__dict__.get("forward")
    forward_of = original or type(model).forward.__get__(model)

    def forward(*args, **kwargs):
        return forward_of(*args, **kwargs)

    params = [p for p in signature.parameters.values() if p is not var_kw]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in extra]
    forward.__signature__ = signature.replace(parameters=params)
    model.forward = forward
    try:
        yield {**{k: v for k, v in bound.items() if k != var_kw.name}, **extra}
    finally:
        del model.forward
        if original is not None:
            model.forward = original


@contextlib.contextmanager
def _quiet_specialisation():
    """A size-1 example dimension becomes static: that is what it means here (a batch of 1 for a cache of batch
    1, one token for a decode step), so export's warning about it is not shown."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _auto_dims(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {i: Dim.AUTO for i in range(value.dim())} if value.dim() else None
    if isinstance(value, (list, tuple)):
        return type(value)(_auto_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    return None


@contextlib.contextmanager
def no_kv_cache(model: nn.Module, kwargs: dict[str, Any]):
    """Hugging Face models return a KV-cache object export cannot flatten; capture without it (every config the
    model holds: an encoder-decoder's decoder keeps a copy of its own)."""
    if "use_cache" in kwargs:
        yield
        return
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)
               is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def share_parameters(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Point the graph at the model's own Parameter objects (export may hand back copies)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        original = own.get(name)
        if original is not None and original is not param and original.shape == param.shape:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            setattr(owner, attr, original)
