"""Adapter checkpoints in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's: ``base_model.model.<key>.lora_A.weight`` / ``.lora_B.weight`` (embedding:
``.lora_embedding_A`` / ``.lora_embedding_B``). An adapter other than ``default`` lives in ``<dir>/<name>/``,
as PEFT saves it. Files are written to a temporary name and renamed, so a crash never leaves half a file.

Example::

    lm.save_pretrained("out")                       # PeftModel.from_pretrained(model, "out") reads it
    lm2 = lora_fx.from_peft(model, "out", example_inputs=(ids,))
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, preview
from .kinds.linear import packed_b, sliced_b
from .store import LoraUnit

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def unit_tensors(unit: LoraUnit) -> dict[str, torch.nn.Parameter]:
    """PEFT's tensor name -> parameter for ``unit`` (A, B, and DoRA's magnitude); a unit in an adapter bank: the
    views of its true rank (``A[:r]``, ``B[:, :r]``), which copying into writes the bank."""
    p = f"{PREFIX}{unit.key}"
    a, b = (unit.lora_A[:unit.r], unit.lora_B[:, :unit.r]) if unit.routed else (unit.lora_A, unit.lora_B)
    out = {f"{p}.{unit.strategy.peft_a}": a, f"{p}.{unit.strategy.peft_b}": b}
    if unit.lora_magnitude_vector is not None:
        out[f"{p}.lora_magnitude_vector"] = unit.lora_magnitude_vector
    if unit.lora_B_bias is not None:
        out[f"{p}.lora_B.bias"] = unit.lora_B_bias
    return out


def adapter_dir(path: str | os.PathLike, adapter_name: str) -> Path:
    return Path(path) if adapter_name == "default" else Path(path) / adapter_name


def peft_config_dict(units: list[LoraUnit], fan_in_fan_out: bool, base_model: str | None,
                     bias: str = "none") -> dict[str, Any]:
    """A LoraConfig dict that makes PEFT build exactly these units (per-key r/alpha as patterns)."""
    r = Counter(u.peft_r for u in units).most_common(1)[0][0]
    alpha = Counter(u.peft_alpha for u in units).most_common(1)[0][0]
    dropouts = Counter(u.dropout_p for u in units)
    if len(dropouts) > 1:
        warnings.warn(f"PEFT has one lora_dropout per adapter; saving the most common of {sorted(dropouts)}.",
                      stacklevel=3)
    rslora, dora, lbias = {u.use_rslora for u in units}, {u.use_dora for u in units}, {u.lora_bias for u in units}
    if len(rslora) > 1 or len(dora) > 1 or len(lbias) > 1:
        raise CheckpointError("PEFT cannot express an adapter that mixes use_rslora (or use_dora, lora_bias) True "
                              "and False across keys; save the two groups as separate adapters.")
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": sorted(u.key for u in units), "exclude_modules": None,
        "rank_pattern": {u.key: u.peft_r for u in units if u.peft_r != r},
        "alpha_pattern": {u.key: u.peft_alpha for u in units if u.peft_alpha != alpha},
        "fan_in_fan_out": fan_in_fan_out, "bias": bias, "use_rslora": rslora.pop(), "use_dora": dora.pop(),
        "modules_to_save": None, "init_lora_weights": _init_for_peft(units), "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": lbias.pop(),
    }


def _init_for_peft(units: list[LoraUnit]) -> bool | str:
    """PiSSA/OLoRA adapters keep their scheme, so PEFT re-derives the residual base when loading them."""
    inits = {u.init for u in units if isinstance(u.init, str) and u.init not in ("default", "gaussian")}
    if len(inits) > 1 or (inits and len(inits) != len({u.init for u in units})):
        raise CheckpointError(f"PEFT cannot express an adapter that mixes inits {sorted(map(str, inits))} with "
                              "others; save them as separate adapters.")
    return inits.pop() if inits else True


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


def save_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                 metadata: dict[str, str] | None = None) -> None:
    """Write one adapter's tensors (by PEFT name) and config into ``directory`` (created if needed) so that no
    crash leaves a loadable mismatched pair: both files are written to temporary names first; then the old
    config is removed, the weights renamed into place, and the config last. A crash in between leaves no
    config (a loud "not found"), never new weights under an old config. Temporary files a killed save left
    behind are removed first."""
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    prepare_dir(directory)
    clean_stale(directory)
    metadata = {"format": "pt", **(metadata or {})}
    weights = temp_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
    try:
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        config_tmp = temp_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
    (directory / CONFIG_NAME).unlink(missing_ok=True)
    os.replace(weights, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)


def clean_stale(directory: Path) -> None:
    """Remove the temporary files of earlier, killed saves in ``directory``."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        stem, suffix = Path(name).stem, Path(name).suffix
        for leftover in directory.glob(f".{stem}.*.tmp{suffix}"):
            leftover.unlink(missing_ok=True)


def temp_write(path: Path, write) -> Path:
    """Write through ``write(tmp)`` to a temporary file beside ``path``, with the usual permissions; returns it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; a saved file gets the usual permissions
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file in the same directory and an atomic rename."""
    os.replace(temp_write(path, write), path)


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: an adapter directory needs {CONFIG_NAME} (and {WEIGHTS_NAME}).")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the adapter.") from None
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


def strip_adapter_name(tensors: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """Accept ``...lora_A.<name>.weight`` (a PEFT state_dict saved by hand) as ``...lora_A.weight``."""
    parts = "lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    pattern = re.compile(rf"\.({parts})\.{re.escape(adapter_name)}(?=\.|$)")
    return {pattern.sub(r".\1", k): v for k, v in tensors.items()}


def check_finite(tensors: dict[str, torch.Tensor], source: Path, strict: bool) -> None:
    """Warn about (``strict``: refuse) tensors holding NaN or Inf, by name."""
    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if not bad:
        return
    message = (f"{source}: tensors {preview(bad, 4)} hold NaN or Inf; the adapter would make the model's outputs "
               "non-finite. Retrain or re-export it" + ("." if strict else " (strict_finite=True refuses it)."))
    if strict:
        raise CheckpointError(message)
    warnings.warn(message, stacklevel=3)


def check_and_copy(units: list[LoraUnit], tensors: dict[str, torch.Tensor], source: Path,
                   extra: dict[str, torch.Tensor] | None = None) -> None:
    """Verify that ``tensors`` hold exactly the units' tensors (and ``extra``'s) with the right shapes, then copy
    them in; nothing is copied unless everything fits."""
    expected = {name: p for unit in units for name, p in unit_tensors(unit).items()}
    expected.update(extra or {})
    tensors = packed_slices(units, tensors, source)
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
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


# ---- output slices: saved as PEFT's whole-layer LoRA, with the slices in the safetensors metadata ------------

SLICES_META = "lora_fx.out_slices"


def _b_name(unit: LoraUnit) -> str:
    return f"{PREFIX}{unit.key}.{unit.strategy.peft_b}"


def slices_metadata(units: list[LoraUnit]) -> dict[str, str]:
    """The safetensors metadata that lets lora_fx read sliced units back with their slices (PEFT ignores it)."""
    sliced = {u.key: {"slices": [list(p) for p in u.slices], "r": u.r, "alpha": u.alpha} for u in units if u.slices}
    return {SLICES_META: json.dumps(sliced, sort_keys=True)} if sliced else {}


def whole_layer(units: list[LoraUnit], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each sliced unit's packed B replaced by PEFT's whole-layer B (``sliced_b``)."""
    out = dict(tensors)
    for u in units:
        if u.slices and _b_name(u) in out:
            out[_b_name(u)] = sliced_b(out[_b_name(u)], u.slices, u.geometry.out_features)
    return out


def packed_slices(units: list[LoraUnit], tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """``tensors`` with each sliced unit's whole-layer B packed to its slices; a B with values outside the
    slices is refused (it is not the sliced adapter this model holds)."""
    out = dict(tensors)
    for u in units:
        name = _b_name(u)
        if not u.slices or name not in out:
            continue
        full, want = out[name], (u.geometry.out_features, u.peft_r)
        if tuple(full.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(full.shape)}; {u.key!r} has output "
                                  f"slices {u.slices} of rank {u.r}, whose whole-layer B is {want}.")
        packed = packed_b(full, u.slices)
        if not torch.equal(sliced_b(packed, u.slices, want[0]), full):
            raise CheckpointError(f"{source}: tensor {name!r} has values outside the output slices {u.slices} of "
                                  f"{u.key!r}; it is a whole-layer adapter. Load it without out_slices.")
        out[name] = packed
    return out


def read_slices(directory: Path) -> dict[str, dict[str, Any]]:
    """The output slices recorded in an adapter's safetensors metadata (key -> slices, r, alpha); {} if none."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return {}
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            text = (f.metadata() or {}).get(SLICES_META)
        return json.loads(text) if text else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable lora_fx metadata ({e}); re-save the adapter.") from None
