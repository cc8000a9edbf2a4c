"""Checkpoint verbs of LoraModel: PEFT-format save and load (with the extra tensors PEFT keeps beside the
adapters: trainable biases, modules_to_save copies, embedding base weights), and hot swaps into the adapter bank.

Loading is a verb like any other: files are read and checked, the new adapter built, and the values to copy
collected aside; the commit copies them, so a failure at any point leaves the model as it was.

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

from ..adapters.tokens import PEFT_SUFFIX as TOKENS_SUFFIX
from ..errors import CheckpointError
from ..peft.checkpoint import (
    PREFIX,
    WEIGHTS_NAME,
    adapter_dir,
    check_finite,
    check_header,
    check_sizes,
    file_tensors,
    fit,
    full_tensor,
    header_expectation,
    read_config,
    read_header,
    read_slices,
    read_tensors,
    save_adapters,
    slices_metadata,
    strip_adapter_name,
    unit_tensors,
)
from ..peft.config import config_for_units, ruleset_from_peft_config, task_type, with_given, with_slices
from ..peft.extras import (
    drop_mha_out_proj,
    embedding_tensors,
    embedding_weights,
    mha_out_proj_zeros,
    refuse_mha_out_proj,
)
from .state import LoraState
from .swap import plan_hotswap
from .verbs import Change, copies, new_entry, with_entry


class CheckpointMixin:
    """save_pretrained / load_adapter for LoraModel (which provides the state and ``_verb``)."""

    def bias_parameters(self, adapter_name: str, state: LoraState | None = None) -> dict[str, nn.Parameter]:
        """The base biases adapter ``adapter_name`` trains (PEFT's ``bias="all"`` / ``"lora_only"``), by the
        names PEFT saves them under."""
        return self._biases((state or self._state).entry(adapter_name))

    def _biases(self, entry: Any) -> dict[str, nn.Parameter]:
        store_name = self._state.store_name
        if entry.bias == "none":
            return {}
        keys, out = set(entry.by_key), {}
        for path, p in self.graph_module.named_parameters():
            owner, _, leaf = path.rpartition(".")
            if leaf != "bias" or path.startswith(store_name + "."):
                continue
            if owner in keys:
                out[f"{PREFIX}{owner}.base_layer.{leaf}"] = p
            elif entry.bias == "all":
                out[f"{PREFIX}{path}"] = p
        return out

    def _extra_tensors(self, entry: Any) -> dict[str, torch.Tensor]:
        """Checkpoint tensors besides the units': trained biases and modules_to_save copies, by PEFT name."""
        out: dict[str, torch.Tensor] = dict(self._biases(entry))
        for path, (_, module) in entry.saved_copies().items():
            out.update({f"{PREFIX}{path}.{n}": p for n, p in module.named_parameters()})
            out.update({f"{PREFIX}{path}.{n}": b for n, b in module.named_buffers()})
        out.update({f"{PREFIX}{path}.{TOKENS_SUFFIX}": t.delta for path, (_, t) in entry.token_deltas().items()})
        for path, saved in entry.saved_ties.items():  # PEFT saves the tied module's copy too
            out[f"{PREFIX}{path}.weight"] = entry.saved_copies()[saved][1].weight
        for head, emb in entry.ties.items():  # PEFT's tied lm_head: lora_A = Bᵀ, lora_B = Aᵀ of the embedding
            unit = entry.by_key[emb]
            out.update({f"{PREFIX}{head}.lora_A.weight": unit.lora_B.T, f"{PREFIX}{head}.lora_B.weight": unit.lora_A.T})
        return out

    def save_pretrained(self, path: str | os.PathLike, adapter_name: str | Iterable[str] | None = None, *,
                        selected_adapters: Iterable[str] | None = None, state_dict: dict | None = None,
                        is_main_process: bool = True, save_embedding_layers: bool | str = "auto",
                        **_: Any) -> None:
        """Write adapters in PEFT's format (``default`` in ``path``, others in ``path/<name>``); all of them, or
        ``adapter_name`` / ``selected_adapters``. Sharded (FSDP2) adapters are gathered first, on every rank;
        only ``is_main_process`` writes. ``state_dict`` (this model's, as ``Trainer`` passes it) supplies the
        values when given. ``save_embedding_layers``: PEFT's rule (``peft.extras``): "auto" saves the embedding
        base weights when ``embed_tokens`` / ``lm_head`` is a target. LoRA on a MultiheadAttention's out_proj is
        refused (PEFT would ignore it)."""
        with self.reading():
            jobs = self._save_jobs(path, adapter_name if adapter_name is not None else selected_adapters,
                                   state_dict, save_embedding_layers)
        if is_main_process:
            save_adapters(Path(path), jobs)

    def _save_jobs(self, path: Any, chosen: Any, state_dict: dict | None, save_embedding_layers: Any) -> list:
        """Everything to write, gathered and checked before the first file is written."""
        state = self._state
        names = state.names if chosen is None else ([chosen] if isinstance(chosen, str) else list(chosen))
        native = {id(t): n for n, t in (*self.named_parameters(), *self.named_buffers())} if state_dict else {}

        def value(t: torch.Tensor) -> torch.Tensor:
            return full_tensor(state_dict.get(native.get(id(t)), t) if state_dict else t)
        source, jobs = state.captured.source, []
        for name in names:
            units = list(state.entry(name).by_key.values())
            tensors = {n: t for u in units for n, t in file_tensors(u, value).items()}
            tensors.update({n: value(t) for n, t in self._extra_tensors(state.entry(name)).items()})
            keys = {u.key for u in units}
            refuse_mha_out_proj(source, keys)
            embeddings = embedding_tensors(source, keys, save_embedding_layers, self.graph_module)
            if embeddings and state.merge is not None:
                raise CheckpointError(f"Saving embedding base weights while {state.merged} is merged would save "
                                      "merged weights as the base; unmerge() first, or save_embedding_layers=False.")
            tensors.update({n: full_tensor(p) for n, p in embeddings.items()})
            tensors.update(mha_out_proj_zeros(source, units))
            jobs.append((adapter_dir(path, name), tensors, self.peft_config_dict(name), slices_metadata(units)))
        return jobs

    def peft_config_dict(self, name: str) -> dict[str, Any]:
        """The adapter_config.json PEFT needs to rebuild adapter ``name``."""
        state = self._state
        units = list(state.entry(name).by_key.values())
        keys = {u.key for u in units}
        fan_in_fan_out = any(getattr(t.geometry, "transposed", False) for t in self.targets if t.key in keys)
        base = getattr(getattr(state.captured.source, "config", None), "_name_or_path", None) or None
        config = config_for_units(units, fan_in_fan_out, base, state.entry(name).bias)
        config["modules_to_save"] = sorted(state.entry(name).saved_copies()) or None
        config["task_type"] = task_type(state.captured.source)
        return with_given(config, state.entry(name).peft_config, units)

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
        header = {k: v for k, v in strip_adapter_name(read_header(directory), adapter_name).items()}

        def read() -> dict[str, torch.Tensor]:  # after the header fits: a wrong file is refused before it is read
            tensors = strip_adapter_name(read_tensors(directory, allow_pickle), adapter_name)
            check_finite(tensors, directory / WEIGHTS_NAME, strict_finite)
            return tensors
        self._verb(lambda s: self._plan_load(s, directory, config, header, read, adapter_name, is_trainable,
                                             hotswap))

    def _plan_load(self, state: LoraState, directory: Path, config: dict, header: dict, read: Any, name: str,
                   is_trainable: bool, hotswap: bool) -> Change:
        source, origin = state.captured.source, directory / WEIGHTS_NAME
        if name in state.entries and not hotswap:
            check_header(header, {n: tuple(t.shape) for u in state.entries[name].by_key.values()
                                  for n, t in unit_tensors(u).items()}, origin)
        ruleset = entry = residuals = None
        if name not in state.entries and not hotswap:
            ruleset = with_slices(ruleset_from_peft_config(config), read_slices(directory))
            expect = header_expectation(header, origin)
            entry, residuals = new_entry(state, name, ruleset, autocast=True, expect=expect)
            refuse_mha_out_proj(source, set(entry.by_key), origin)
        known = entry if entry is not None else state.entries.get(name)
        known = {n for u in known.by_key.values() for n in unit_tensors(u)} if known is not None else set()
        check_sizes({n: s for n, s in header.items() if n not in known},  # (LoRA factors: checked by shape above)
                    max((t.numel() for t in (*source.parameters(), *source.buffers())), default=0), origin)
        tensors = read()
        tensors = drop_mha_out_proj(tensors, source, origin)
        whole = [*(config.get("modules_to_save") or ()), *(entry.saved_ties if entry is not None else ())]
        tensors, embeddings = embedding_weights(tensors, source, self.graph_module, origin, whole)
        changed = [(p, v) for p, v in embeddings if not torch.equal(p.detach().cpu(), v.to(p.dtype))]
        if changed and (hotswap or state.merge is not None):
            raise CheckpointError(f"{origin} holds embedding base weights that differ from the model's; "
                                  + ("a hot swap changes adapters only" if hotswap else
                                     f"unmerge() {state.merged} first") + ". Load it as a new adapter (or re-save it "
                                  "with save_embedding_layers=False if the base is the same).")
        if hotswap:
            return plan_hotswap(state, directory, name, config, tensors)
        frozen = state.frozen | {name} if not is_trainable else state.frozen - {name}
        if name in state.entries:  # the existing adapter's weights, in place
            entry = state.entries[name]
            pairs = fit(list(entry.by_key.values()), tensors, origin, self._extra_tensors(entry))
            return Change(state.next(frozen=frozen), [copies(pairs), copies(changed)], derive=False)
        pairs = fit(list(entry.by_key.values()), tensors, origin, self._extra_tensors(entry))
        own = {id(t) for t in (*entry.parameters(), *entry.buffers())}
        with torch.no_grad():  # the new adapter is not live yet: filled now; the model's own tensors at commit
            for param, value in pairs:
                if id(param) in own:
                    param.copy_(value)
        change = with_entry(state, name, entry, residuals, frozen=not is_trainable)
        live = [(p, v) for p, v in pairs if id(p) not in own]
        change.effects += [copies(live), copies(changed)]  # PEFT's embedding base weights replace the model's
        return change
