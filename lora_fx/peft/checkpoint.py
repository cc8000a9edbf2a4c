"""Adapter checkpoints in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's: ``base_model.model.<key>.lora_A.weight`` / ``.lora_B.weight`` (embedding:
``.lora_embedding_A`` / ``.lora_embedding_B``; each variant adds its own, see ``Variant.peft_tensors``). An adapter
other than ``default`` lives in ``<dir>/<name>/``, as PEFT saves it. Files are written to a temporary name and
renamed, so a crash never leaves half a file. Reading checks everything (names, shapes, dtypes) and returns what
to copy where; the caller copies inside its transaction.

Example::

    lm.save_pretrained("out")                       # PeftModel.from_pretrained(model, "out") reads it
    lm2 = lora_fx.from_peft(model, "out", example_inputs=(ids,))
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import clean_temporaries, commit_files, recover, temp_write
from ..errors import CheckpointError, preview
from ..variants import sliced

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def parameter_keys(keys: list[str], source: Any) -> dict[str, str]:
    """PEFT's module name for each parameter target key (``target_parameters``): the owning module, behind one
    ``base_layer.`` per parameter of the same module targeted after it (PEFT nests one wrapper per parameter, in
    the module's registration order), e.g. ``experts.gate_up_proj`` -> ``experts.base_layer`` when ``down_proj``
    is targeted too."""
    owners: dict[str, list[str]] = {}
    for key in keys:
        owners.setdefault(key.rpartition(".")[0], []).append(key.rpartition(".")[2])
    out = {}
    for owner, leaves in owners.items():
        try:
            order = [n for n, _ in source.get_submodule(owner).named_parameters(recurse=False)]
        except AttributeError:
            order = sorted(leaves)
        ranked = sorted(leaves, key=lambda n: order.index(n) if n in order else len(order))
        for i, leaf in enumerate(ranked):
            out[f"{owner}.{leaf}" if owner else leaf] = owner + ".base_layer" * (len(ranked) - 1 - i)
    return out


def unit_tensors(unit: Any) -> dict[str, torch.Tensor]:
    """PEFT's tensor name -> the unit's tensor (its variant's names; a padded bank slot: views of its true rank,
    which copying into writes the slot)."""
    return {f"{PREFIX}{unit.peft_key}.{suffix}": t for suffix, t in unit.variant.peft_tensors(unit).items()}


def file_tensors(unit: Any, value=lambda t: t) -> dict[str, torch.Tensor]:
    """PEFT's tensor name -> what PEFT's file holds there for ``unit`` (``value`` maps each of the unit's tensors
    first: a Trainer's state_dict entry, a gathered shard; output slices are written as PEFT's whole-layer B)."""
    mine = {suffix: value(t) for suffix, t in unit.variant.peft_tensors(unit).items()}
    return {f"{PREFIX}{unit.peft_key}.{s}": t for s, t in unit.variant.saved_tensors(unit, mine).items()}


def adapter_dir(path: str | os.PathLike, adapter_name: str) -> Path:
    return Path(path) if adapter_name == "default" else Path(path) / adapter_name


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor, FSDP2) tensor gathered whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def prepare_dir(directory: Path) -> None:
    """Create ``directory`` if needed (a dangling symlink or a file there is refused by name)."""
    if directory.is_symlink() and not directory.exists():
        raise CheckpointError(f"{directory} is a symlink to nothing; remove it or point it at a directory.")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory; choose another path.")
    directory.mkdir(parents=True, exist_ok=True)


JOURNAL = ".lora_fx_save.journal"


def save_adapters(root: Path, jobs: list[tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict | None]]) -> None:
    """Write adapters (each ``(directory, tensors by PEFT name, config, metadata)``) as one snapshot: every file is
    written to a temporary name first (a failure there leaves the old files untouched), then all are renamed into
    place under a journal in ``root`` (``atomic.commit_files``): a crash or kill at any point leaves all the old
    adapters or all the new ones, never two saves mixed, nor new weights under an old config. Temporary files a
    killed save left behind are removed first."""
    recover(root / JOURNAL)
    if root.is_dir():
        clean_temporaries(root, (JOURNAL,))
    staged: list[tuple[Path, Path]] = []
    try:
        for directory, tensors, config, metadata in jobs:
            tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
            prepare_dir(directory)
            clean_temporaries(directory, (WEIGHTS_NAME, CONFIG_NAME))
            meta = {"format": "pt", **(metadata or {})}
            weights = temp_write(directory / WEIGHTS_NAME, lambda p, t=tensors, m=meta: save_file(t, p, metadata=m))
            staged.append((weights, directory / WEIGHTS_NAME))
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"
            staged.append((temp_write(directory / CONFIG_NAME, lambda p, t=text: Path(p).write_text(t)),
                           directory / CONFIG_NAME))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    commit_files(staged, root / JOURNAL)


def recover_saves(directory: Path) -> None:
    """Put back the snapshot a killed save into ``directory`` (or into its parent, for a named adapter's
    sub-directory) left half committed."""
    for root in (directory, directory.parent):
        recover(root / JOURNAL)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError as e:  # an unreadable directory
        raise CheckpointError(f"{path.parent} cannot be read ({type(e).__name__}: {e.strerror or e}); check its "
                              "permissions.") from None


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    recover_saves(directory)
    if not _is_file(path):
        raise CheckpointError(f"{path} not found: an adapter directory needs {CONFIG_NAME} (and {WEIGHTS_NAME}).")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the adapter.") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be an adapter config; re-save the adapter.") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e.strerror or e}); check its "
                              "permissions.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def read_tensors(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-save the adapter.") from None
    pickled = directory / PICKLE_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{pickled} is a pickle, which can run code when loaded; lora_fx reads safetensors only. "
                "Convert it to adapter_model.safetensors, or pass allow_pickle=True if you trust the file."
            )
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pickled} could not be loaded ({e}).") from None
    raise CheckpointError(f"{path} not found: the adapter directory has no {WEIGHTS_NAME}.")


def read_header(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header, without reading any tensor ({} for a pickle file or none:
    those are checked once read)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return {}
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-save the adapter.") from None


def check_header(header: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    """Refuse, before reading them, tensors whose header shape is not the one the model needs."""
    for name, shape in expected.items():
        if name in header and header[name] != shape:
            vocab = name.endswith("lora_embedding_A") and header[name][:1] == shape[:1]
            hint = (f"the adapter was made for a vocabulary of {header[name][-1]}: resize the model's token "
                    "embeddings to it (model.resize_token_embeddings) before loading it" if vocab else
                    "rank or feature size differ")
            raise CheckpointError(f"{source}: tensor {name!r} has shape {header[name]} in its header, the model needs "
                                  f"{shape} ({hint}); nothing was read or allocated.")


def check_sizes(header: dict[str, tuple[int, ...]], largest: int, source: Path) -> None:
    """Refuse, before reading, a tensor the header declares larger than any tensor of the model (``header``: the
    names besides the LoRA factors, whose shapes are checked exactly): no saved module, embedding weight or token
    delta is, so the file is corrupt or made for another model."""
    for name, shape in header.items():
        numel = math.prod(shape)
        if numel > max(largest, 1):
            raise CheckpointError(f"{source}: tensor {name!r} declares shape {shape} ({numel:,} elements), larger "
                                  f"than any weight of this model ({largest:,}); the file is corrupt or made for "
                                  "another model. Nothing was read or allocated.")


def header_expectation(header: dict[str, tuple[int, ...]], source: Path):
    """``expect(key, {suffix: shape})`` for ``new_entry``: each unit's A and B as the file's header declares them."""
    def expect(key: str, shapes: dict[str, tuple[int, ...]]) -> None:
        check_header(header, {f"{PREFIX}{key}.{suffix}": shape for suffix, shape in shapes.items()}, source)
    return expect


def strip_adapter_name(tensors: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """Accept ``...lora_A.<name>.weight`` (a PEFT state_dict saved by hand) as ``...lora_A.weight``."""
    parts = "lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    pattern = re.compile(rf"\.({parts})\.{re.escape(adapter_name)}(?=\.|$)")
    return {pattern.sub(r".\1", k): v for k, v in tensors.items()}


def check_finite(tensors: dict[str, torch.Tensor], source: Path, strict: bool) -> None:
    """Warn about (``strict``: refuse) tensors holding NaN or Inf, by name."""
    def finite(t: torch.Tensor) -> bool:  # float8 has no isfinite kernel: widen it
        return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())

    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not finite(t))
    if not bad:
        return
    message = (f"{source}: tensors {preview(bad, 4)} hold NaN or Inf; the adapter would make the model's outputs "
               "non-finite. Retrain or re-export it" + ("." if strict else " (strict_finite=True refuses it)."))
    if strict:
        raise CheckpointError(message)
    warnings.warn(message, stacklevel=4)


def fit(units: list, tensors: dict[str, torch.Tensor], source: Path,
        extra: dict[str, torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Verify that ``tensors`` hold exactly the units' tensors (and ``extra``'s) with the right shapes; returns the
    ``(destination, value)`` pairs to copy (nothing is copied here)."""
    expected = {name: p for unit in units for name, p in unit_tensors(unit).items()}
    expected.update(extra or {})
    tensors = dict(tensors)
    for unit in units:
        prefix = f"{PREFIX}{unit.peft_key}."
        mine = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        tensors.update({prefix + s: t for s, t in unit.variant.loaded_tensors(unit, mine, source).items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {preview(missing, 4)}; the checkpoint does not fit "
                              "this model (was it saved for another model or config?).")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {preview(unexpected, 4)} that no target of this "
                              "model uses; the checkpoint was saved for another model or config.")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the model "
                                  f"needs {tuple(param.shape)} (rank or feature size differ).")
        if tensors[name].is_floating_point() != param.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {tensors[name].dtype}; the model holds "
                                  f"{param.dtype} there.")
    return [(param, tensors[name]) for name, param in expected.items()]


def slices_metadata(units: list) -> dict[str, str]:
    """The safetensors metadata that lets lora_fx read output-sliced units back with their ranges (PEFT ignores
    it)."""
    return sliced.write_metadata({u.key: u.variant.peft_metadata(u) for u in units
                                  if isinstance(u.variant, sliced.Sliced)})


def read_slices(directory: Path) -> dict[str, dict[str, Any]]:
    """The output slices recorded in an adapter's safetensors metadata (key -> slices, r, alpha); {} if none."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return {}
    try:
        with safe_open(path, "pt") as f:
            return sliced.read_metadata((f.metadata() or {}).get(sliced.Sliced.metadata_key()))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable lora_fx metadata ({e}); re-save the adapter.") from None
