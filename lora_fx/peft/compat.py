"""Standing in for a ``peft.PeftModel`` where the ecosystem checks for one.

transformers' ``Trainer`` (and TRL's trainers) decide how to save, resume and introspect a model with
``isinstance(model, PeftModel)``: only then are checkpoints adapter directories and ``resume_from_checkpoint``
reloads the adapter. With PEFT installed, ``lorafy`` therefore returns an instance of ``LoraModel`` that is also a
``PeftModel`` subclass. Every PEFT method the ecosystem calls is lora_fx's own (``save_pretrained``,
``load_adapter``, ``set_adapter``, ``peft_config``, ``get_base_model``, ``disable_adapter``, ...); PEFT internals
lora_fx does not reproduce raise ``AdapterError`` instead of running on a model they do not describe. Attributes
the LoraModel does not have are read from the wrapped model (``lm.config``, ``lm.generation_config``), as PEFT
forwards them to its base model.

Example::

    isinstance(lm, peft.PeftModel)                 # True when PEFT is installed
    lm.peft_config["default"].r                    # a peft.LoraConfig
    with lm.disable_adapter():                     # the base model, as in PEFT
        ref = lm(ids).logits
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from ..errors import AdapterError


class PeftCompatMixin:
    """The parts of PeftModel's interface that transformers, TRL and PEFT users rely on, done lora_fx's way."""

    @property
    def peft_config(self) -> dict[str, Any]:
        """adapter name -> ``peft.LoraConfig`` describing it, as PEFT saves it."""
        from peft import LoraConfig

        out = {}
        for name in self.adapters.names:
            fields = self.peft_config_dict(name)
            fields = {k: v for k, v in fields.items() if k not in ("peft_type",)}
            out[name] = LoraConfig(**fields)
        return out

    @property
    def active_adapter(self) -> str:
        active = self.active_adapters
        if not active:
            raise AdapterError("No adapter is active; call set_adapter(name).")
        return active[0]

    @property
    def active_peft_config(self) -> Any:
        return self.peft_config[self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        return bool(self.active_adapters)

    @property
    def modules_to_save(self) -> set[str] | None:
        paths = {p for name in self.adapters.names for p in self.adapters.saved(name)}
        return paths or None

    @property
    def base_model(self) -> _BaseModelView:
        """PEFT's ``peft_model.base_model``: ``.model`` is the wrapped model; other attributes are the LoraModel's."""
        return _BaseModelView(self)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its own forward runs without the unmerged adapters)."""
        return self.state.captured.source

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model: no adapter active inside the block (PEFT's ``with model.disable_adapter():``)."""
        if self.merged_adapters:
            raise AdapterError(f"Adapters {self.merged_adapters} are merged into the weights; unmerge() first.")
        active = self.active_adapters
        self.set_adapter([])
        try:
            yield
        finally:
            self.set_adapter(active)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.adapters.entry(name).requires_grad_(requires_grad)

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise AdapterError("This PEFT method is internal to PEFT's own LoraModel and is not part of lora_fx; see "
                           "lm.report() for the layer status and lm.adapters for the adapters.")

    get_layer_status = get_model_status = get_prompt = get_prompt_embedding_to_save = _unsupported
    prepare_model_for_gradient_checkpointing = create_or_update_model_card = _unsupported

    @property
    def base_model_torch_dtype(self) -> Any:
        return getattr(self.state.captured.source, "dtype", None)


class _BaseModelView:
    def __init__(self, lm: nn.Module) -> None:
        self.lm = lm

    @property
    def model(self) -> nn.Module:
        return self.lm.state.captured.source

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)


def peft_compatible(cls: type) -> type:
    """``cls``, or (PEFT installed) a subclass of it that is also a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:
        return cls
    return type(cls.__name__, (cls, PeftModel), {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                                 "__qualname__": cls.__qualname__})
