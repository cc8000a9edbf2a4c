"""Checkpoint verbs of LoraModel: PEFT-format save/load, plus the extra tensors PEFT keeps beside the
adapters (trainable biases, modules_to_save copies).

Example::

    lm.save_pretrained("out")                  # out/adapter_config.json + out/adapter_model.safetensors
    lm.load_adapter("other_dir", adapter_name="other")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    PREFIX,
    WEIGHTS_NAME,
    adapter_dir,
    check_and_copy,
    check_finite,
    full_tensor,
    peft_config_dict,
    read_config,
    read_slices,
    read_tensors,
    save_adapter,
    slices_metadata,
    strip_adapter_name,
    unit_tensors,
    whole_layer,
)
from .errors import CheckpointError
from .peft_config import ruleset_from_peft_config, with_slices
from .peft_extras import (
    copy_weights,
    drop_mha_out_proj,
    embedding_tensors,
    embedding_weights,
    mha_out_proj_zeros,
    refuse_mha_out_proj,
)


class CheckpointMixin:
    """save_pretrained / load_adapter for LoraModel (which provides adapters, targets and the graph)."""

    def _extra_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Checkpoint tensors besides the units': trained biases and modules_to_save copies, by PEFT name."""
        out = self.bias_parameters(adapter_name)
        for path, (_, module) in self.adapters.saved(adapter_name).items():
            out.update({f"{PREFIX}{path}.{n}": p for n, p in module.named_parameters()})
            out.update({f"{PREFIX}{path}.{n}": b for n, b in module.named_buffers()})
        return out

    def bias_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base biases adapter ``adapter_name`` trains (PEFT's ``bias="all"`` / ``"lora_only"``), by the
        names PEFT saves them under."""
        mode = self.adapters.entry(adapter_name).bias
        if mode == "none":
            return {}
        keys = set(self.adapters.units(adapter_name))
        out = {}
        for path, p in self.graph_module.named_parameters():
            owner, _, leaf = path.rpartition(".")
            if leaf != "bias" or path.startswith(self._store_name + "."):
                continue
            if owner in keys:
                out[f"{PREFIX}{owner}.base_layer.{leaf}"] = p
            elif mode == "all":
                out[f"{PREFIX}{path}"] = p
        return out

    def save_pretrained(self, path: str | os.PathLike, adapter_name: str | Iterable[str] | None = None, *,
                        selected_adapters: Iterable[str] | None = None, state_dict: dict | None = None,
                        is_main_process: bool = True, save_embedding_layers: bool | str = "auto",
                        **_: Any) -> None:
        """Write adapters in PEFT's format (``default`` in ``path``, others in ``path/<name>``); all of them, or
        ``adapter_name`` / ``selected_adapters``. Sharded (FSDP2) adapters are gathered first, on every rank;
        only ``is_main_process`` writes. ``state_dict`` (this model's, as ``Trainer`` passes it) supplies the
        values when given. ``save_embedding_layers``: PEFT's rule (``peft_extras``): "auto" saves the embedding
        base weights when ``embed_tokens`` / ``lm_head`` is a target. LoRA on a MultiheadAttention's out_proj is
        refused (PEFT would ignore it)."""
        chosen = adapter_name if adapter_name is not None else selected_adapters
        names = self.adapters.names if chosen is None else ([chosen] if isinstance(chosen, str) else list(chosen))
        native = {id(t): n for n, t in (*self.named_parameters(), *self.named_buffers())} if state_dict else {}
        jobs = []  # everything is gathered and checked before the first file is written
        for name in names:
            tensors = {peft_name: full_tensor(state_dict.get(native.get(id(p)), p) if state_dict else p)
                       for peft_name, p in self._adapter_tensors(name).items()}
            units = list(self.adapters.units(name).values())
            keys = {u.key for u in units}
            refuse_mha_out_proj(self._captured.source, keys)
            embeddings = embedding_tensors(self._captured.source, keys, save_embedding_layers, self.graph_module)
            if embeddings and self._merge is not None:
                raise CheckpointError(f"Saving embedding base weights while {self._merge.adapters} is merged would "
                                      "save merged weights as the base; unmerge() first, or save_embedding_layers="
                                      "False.")
            tensors.update({n: full_tensor(p) for n, p in embeddings.items()})
            tensors.update(mha_out_proj_zeros(self._captured.source, units))
            jobs.append((adapter_dir(path, name), whole_layer(units, tensors), self._peft_config(name),
                         slices_metadata(units)))
        if is_main_process:
            for directory, tensors, config, metadata in jobs:
                save_adapter(directory, tensors, config, metadata)

    def _peft_config(self, name: str) -> dict[str, Any]:
        """The adapter_config.json PEFT needs to rebuild adapter ``name``."""
        units = list(self.adapters.units(name).values())
        keys = {u.key for u in units}
        fan_in_fan_out = any(getattr(t.geometry, "transposed", False) for t in self.targets if t.key in keys)
        base = getattr(getattr(self._captured.source, "config", None), "_name_or_path", None) or None
        config = peft_config_dict(units, fan_in_fan_out, base, self.adapters.entry(name).bias)
        config["modules_to_save"] = sorted(self.adapters.saved(name)) or None
        return config

    def _adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """PEFT's tensor name -> parameter, for everything adapter ``name`` saves."""
        out = {n: p for unit in self.adapters.units(name).values() for n, p in unit_tensors(unit).items()}
        out.update(self._extra_tensors(name))
        return out

    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default", *, allow_pickle: bool = False,
                     is_trainable: bool = True, hotswap: bool = False, strict_finite: bool = False,
                     **_: Any) -> None:
        """Read a PEFT adapter directory into adapter ``adapter_name``: a new adapter, or, when that name exists
        (as ``Trainer`` does on ``resume_from_checkpoint``), the existing one's weights in place, which must then
        have the same targets and shapes. ``is_trainable=False``: its weights stay frozen even when active. On any
        error (missing file, wrong keys or shapes, a config naming modules the model lacks) the model is left as
        it was.

        ``hotswap=True`` replaces the existing adapter's weights in the adapter bank in place: any rank up to the
        bank's maximum, any alpha and dropout, the same targets or a subset (the others zeroed); the graphs do not
        change, so a compiled model does not recompile (see ``build_adapter_bank``). NaN or Inf in the tensors:
        a warning naming them (``strict_finite=True``: an error, nothing loaded)."""
        directory = Path(path)
        config = read_config(directory)
        tensors = strip_adapter_name(read_tensors(directory, allow_pickle), adapter_name)
        check_finite(tensors, directory / WEIGHTS_NAME, strict_finite)
        tensors = drop_mha_out_proj(tensors, self._captured.source, directory / WEIGHTS_NAME)
        tensors, embeddings = embedding_weights(tensors, self._captured.source, self.graph_module,
                                                directory / WEIGHTS_NAME, config.get("modules_to_save"))
        changed = [(p, v) for p, v in embeddings if not torch.equal(p.detach().cpu(), v.to(p.dtype))]
        if changed and (hotswap or self._merge is not None):
            raise CheckpointError(f"{directory / WEIGHTS_NAME} holds embedding base weights that differ from the "
                                  "model's; " + ("a hot swap changes adapters only" if hotswap else
                                                 f"unmerge() {self._merge.adapters} first") + ". Load it as a new "
                                  "adapter (or re-save it with save_embedding_layers=False if the base is the same).")
        if hotswap:
            self._hotswap(directory, adapter_name, config, tensors)
            return
        if adapter_name in self.adapters.names:
            check_and_copy(list(self.adapters.units(adapter_name).values()), tensors, directory / WEIGHTS_NAME,
                           self._extra_tensors(adapter_name))
            copy_weights(changed)
            self._trainable(adapter_name, is_trainable)
            return
        ruleset = with_slices(ruleset_from_peft_config(config), read_slices(directory))
        undo = self._add(adapter_name, ruleset, autocast_adapter_dtype=True)
        try:
            check_and_copy(list(self.adapters.units(adapter_name).values()), tensors, directory / WEIGHTS_NAME,
                           self._extra_tensors(adapter_name))
            self.set_adapter(self.active_adapters or adapter_name)
        except BaseException:
            self._discard_adapter(adapter_name, undo)  # PiSSA/OLoRA residuals written by _add go back too
            raise
        copy_weights(changed)  # PEFT's saved embedding base weights replace the model's, as PEFT loads them
        self._trainable(adapter_name, is_trainable)

    def _trainable(self, name: str, trainable: bool) -> None:
        self.adapters.entry(name).trainable = trainable
        self._freeze()
