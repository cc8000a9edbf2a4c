"""``lorafy``: capture a model, match rules, and insert LoRA branches as graph rewrites.

Example::

    import lora_fx
    lm = lora_fx.lorafy(model, lora_fx.Rule(["q_proj", "v_proj"], r=8, alpha=16),
                        example_inputs=(input_ids,))
    print(lm.report())
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .adapters.store import check_adapter_name
from .capture import capture
from .capture.replicate import replicate_layers
from .errors import CaptureError, CheckpointError
from .model import LoraModel
from .peft.checkpoint import read_config
from .peft.compat import peft_compatible
from .rules import RuleLike, as_ruleset


def lorafy(
    model: nn.Module,
    rules: RuleLike,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    fuse: bool = True,
    fused_loss: bool = False,
) -> LoraModel:
    """Add LoRA to ``model``'s layers that ``rules`` select: ``y = W x + s · B A dropout(x)``.

    ``rules``: a Rule, a string, a sequence of them, or a ``peft.LoraConfig``. With ``example_inputs`` /
    ``example_kwargs`` the model is captured with ``torch.export`` (needed for Hugging Face models),
    otherwise with ``torch.fx.symbolic_trace``. The graph shares the model's parameters; base parameters
    are frozen (``requires_grad=False``), as PEFT does. fp16/bf16 base weights get float32 adapters unless
    ``autocast_adapter_dtype=False``. ``fuse=False`` keeps every LoRA branch as plain ``F.linear`` / ``*`` /
    ``+`` nodes (same math as PEFT, op for op) instead of the fused sibling ops. ``fused_loss=True``: where the
    model computes its language-model loss (called with ``labels``), compute it from the hidden states a chunk of
    tokens at a time (``ops.fused_loss``): the ``[tokens, vocab]`` logits are never materialised, and the output's
    ``logits`` is None in those calls.
    """
    if isinstance(model, LoraModel):
        raise CaptureError("lorafy got a LoraModel, which already has adapters; add another with "
                           "lm.add_adapter(name, rules), or lorafy the model it wraps (lm.get_base_model()).")
    if is_peft_model(model):
        raise CaptureError(f"lorafy got a peft.{type(model).__name__}. To keep its adapters, migrate it in one line: "
                           "lora_fx.from_peft(peft_model, example_inputs=...) takes its base model and every adapter; "
                           "to start afresh, lorafy(peft_model.unload(), rules, ...).")
    ruleset = as_ruleset(rules)
    check_adapter_name(adapter_name)
    with _replicated(model, ruleset.layer_replication) as layers:
        lm = _model_class()(capture(model, example_inputs, example_kwargs), fuse=fuse, fused_loss=fused_loss,
                            layer_replication=layers)
        with _discard_on_error(lm):
            lm.add_adapter(adapter_name, ruleset, autocast_adapter_dtype=autocast_adapter_dtype)
    return lm


def from_peft(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    adapter_name: str = "default",
    allow_pickle: bool = False,
    strict_finite: bool = False,
    fused_loss: bool = False,
) -> LoraModel:
    """Capture ``model`` and load the PEFT adapter directory ``path`` into it (config and weights). NaN or Inf
    in the adapter's tensors: a warning naming them, an error with ``strict_finite=True``.

    ``model`` may be a ``peft.PeftModel`` itself: its base model is captured and every adapter it holds is
    loaded under its own name (the active one active), with no ``path``: a one-line migration. The PeftModel is
    unloaded in the process (PEFT's ``unload()``: its layers unwrapped, weights untouched), as its base model now
    belongs to the LoraModel.

    Example::

        lm = lora_fx.from_peft(AutoModelForCausalLM.from_pretrained(base), "my-adapter",
                               example_inputs=(input_ids,))
        lm = lora_fx.from_peft(peft_model, example_inputs=(input_ids,))      # migrate a PeftModel
    """
    check_adapter_name(adapter_name)
    with contextlib.ExitStack() as stack:
        adapters = [(adapter_name, path)] if path is not None else []
        if is_peft_model(model):
            model, saved, active = migrate(model, stack.enter_context(tempfile.TemporaryDirectory()))
            adapters = adapters or saved
            active = [adapter_name] if path is not None else active
            layers = replicated_by(saved)  # PEFT replicated the base model's layers already
        elif path is None:
            raise CheckpointError("from_peft needs the adapter directory `path` (or a peft.PeftModel as `model`).")
        else:
            active = [adapter_name]
            layers = stack.enter_context(_replicated(model, _layer_map(Path(path))))
        lm = _model_class()(capture(model, example_inputs, example_kwargs), fused_loss=fused_loss,
                            layer_replication=layers)
        with _discard_on_error(lm):
            for name, directory in adapters:
                lm.load_adapter(directory, name, allow_pickle=allow_pickle, strict_finite=strict_finite)
            lm.set_adapter(active)
    return lm


def is_peft_model(model: Any) -> bool:
    """A ``peft.PeftModel`` (a LoraModel is one too when PEFT is installed: it is not meant here)."""
    return not isinstance(model, LoraModel) and any(
        c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def migrate(peft_model: Any, tmp: str) -> tuple[nn.Module, list[tuple[str, Path]], list[str]]:
    """A PeftModel's adapters saved in PEFT's format under ``tmp``, its base model unwrapped (weights untouched),
    and its active adapters: ``(base model, [(name, directory)], active)``."""
    merged = [n for n, m in peft_model.named_modules() if getattr(m, "merged", False)]
    if merged:
        raise CheckpointError(f"The PeftModel has adapters merged into {merged[:3]}; unmerge_adapter() it first, so "
                              "its base weights are the base model's.")
    names = list(peft_model.peft_config)
    active = peft_model.active_adapters if isinstance(peft_model.active_adapters, list) else [
        peft_model.active_adapter]
    peft_model.save_pretrained(tmp, selected_adapters=names)
    dirs = [(name, Path(tmp) if name == "default" else Path(tmp) / name) for name in names]
    return peft_model.unload(), dirs, list(active)


@functools.cache
def _model_class() -> type[LoraModel]:
    """LoraModel, also a peft.PeftModel when PEFT is installed (see ``peft_compat``)."""
    return peft_compatible(LoraModel)


@contextlib.contextmanager
def _replicated(model: nn.Module, layer_map: tuple | None):
    """PEFT's layer_replication done to ``model`` for the block (its map, or None), undone if the block fails."""
    if not layer_map:
        yield None
        return
    undo = replicate_layers(model, layer_map)
    try:
        yield layer_map
    except BaseException:
        undo()
        raise


def replicated_by(adapters: list[tuple[str, Path]]) -> tuple | None:
    """The layer map PEFT applied for these saved adapters (the first that has one)."""
    return next((m for m in (_layer_map(Path(d)) for _, d in adapters) if m), None)


def _layer_map(directory: Path) -> tuple | None:
    found = read_config(directory).get("layer_replication")
    return tuple(tuple(span) for span in found) if found else None


@contextlib.contextmanager
def _discard_on_error(lm: LoraModel):
    """A failed call leaves nothing behind: no adapter store on a GraphModule passed in, the base parameters'
    ``requires_grad`` as they were."""
    try:
        yield
    except BaseException:
        lm.discard()
        raise
    lm.release_snapshot()  # the snapshot held every base parameter; once lorafy succeeded it is not needed
