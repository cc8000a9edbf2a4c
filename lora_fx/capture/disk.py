"""An on-disk cache of exported programs: a process started again skips ``torch.export`` for a call it has seen.

``torch.export`` is most of a capture's time (about 0.7 s of ``lorafy`` on a 4-layer tiny Llama, 2 s in a fresh
process); reading its program back is about 0.3 s. An entry is keyed, as Inductor keys its FX graph cache, by
everything the graph depends on:

- lora_fx, torch, transformers and Python versions;
- the model's class, the source files of every module class it holds, its config (``config.to_json_string``
  plus the attention / experts implementation), its module tree (``repr``), every parameter's and buffer's name,
  shape, dtype and device, and each module's train/eval mode;
- the call (``calls.call_key``: argument names, dtypes, ranks, size-1 dimensions, non-tensor values) and the form
  of the capture (templated or whole).

Entries hold the graph, not the weights: on a hit the program is rebuilt over the model's own parameters and
buffers, and the capture is checked against the model's eager output on the example inputs before it is used
(a mismatch drops the entry and captures afresh). A model with instance-level ``forward`` overrides or module
hooks is never cached (a function cannot be keyed). Files are written through a temporary file and a rename.

Location: ``$LORA_FX_CACHE_DIR/captures`` (default ``$XDG_CACHE_HOME/lora_fx`` or ``~/.cache/lora_fx``); at most
``LORA_FX_CAPTURE_CACHE_MB`` MiB (default 256), least recently used entries removed first;
``LORA_FX_CAPTURE_CACHE=0`` turns it off. ``clear_capture_cache()`` (or ``lora-fx cache clear``) empties it.

Example::

    entry = cache_entries(model, call, positional)("templated")
    hit = entry.load(model) if entry else None          # (ExportedProgram, state) or None
    ...
    entry.store(program, state, model)
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import pickle
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write

FORMAT = 2
_LOG = logging.getLogger("lora_fx.capture_cache")


def cache_dir() -> Path:
    """The folder capture entries are kept in (see the module docstring)."""
    root = os.environ.get("LORA_FX_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_fx"
    return Path(root) / "captures"


def enabled() -> bool:
    return os.environ.get("LORA_FX_CAPTURE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def capacity_bytes() -> int:
    value = os.environ.get("LORA_FX_CAPTURE_CACHE_MB", "256")
    try:
        return max(1, int(float(value) * 2**20))
    except ValueError:
        raise ValueError(f"LORA_FX_CAPTURE_CACHE_MB={value!r}: give the capture cache's cap in MiB (a number, "
                         "default 256).") from None


def clear_capture_cache() -> int:
    """Remove every capture cache entry; returns how many were removed."""
    removed = 0
    for f in _entries():
        f.unlink(missing_ok=True)
        removed += 1
    return removed


def cache_info() -> str:
    """Where the cache is, whether it is on, how many entries and bytes it holds, and its cap."""
    entries = _entries()
    size = sum(f.stat().st_size for f in entries if f.exists())
    state = "on" if enabled() else "off (LORA_FX_CAPTURE_CACHE=0)"
    return (f"capture cache: {cache_dir()} ({state}); {len(entries)} entries, {size / 2**20:.1f} MiB "
            f"of at most {capacity_bytes() / 2**20:.1f} MiB (LORA_FX_CAPTURE_CACHE_MB)")


@dataclass
class CacheEntry:
    """One key's file. ``load`` gives the stored program rebuilt over ``model``'s tensors (None on a miss);
    ``store`` writes one."""

    path: Path
    key: str

    def load(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]
             ) -> tuple[torch.export.ExportedProgram, dict] | None:
        if not self.path.is_file():
            return None
        try:
            with open(self.path, "rb") as f:
                stored = pickle.load(f)  # noqa: S301 (the user's own cache folder, created 0700)
            if stored.get("key") != self.key:
                return None
            program = _deserialize(stored, model, args, kwargs)
        except Exception as e:  # an entry that cannot be read back is only a miss
            _LOG.info("capture cache entry %s dropped: %s: %s", self.path.name, type(e).__name__, e)
            self.drop()
            return None
        os.utime(self.path)  # most recently used
        return program, stored["state"]

    def store(self, program: torch.export.ExportedProgram, state: dict, model: nn.Module) -> None:
        try:
            from torch._export.serde.serialize import ExportedProgramSerializer

            serialized = ExportedProgramSerializer().serialize(
                program, serialize_state_dict=False, serialize_example_inputs=False)
            guards = list(getattr(program, "_guards_code", []))  # the tracer's own input guards: not serialised
            owners = {id(t): name for name, t in _tensors(model).items()}
            aliases = {name: owners[id(t)] for name, t in program.constants.items() if id(t) in owners}
            data = pickle.dumps({"key": self.key, "program": serialized.exported_program, "guards": guards,
                                 "aliases": aliases, "constants": serialized.constants,
                                 "tensors": list(program.state_dict), "state": state}, protocol=5)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(data))
            _evict(capacity_bytes())
        except Exception as e:  # this torch cannot serialise the program (or the folder is read-only): no entry
            _LOG.info("capture not cached: %s: %s", type(e).__name__, e)

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


def cache_entries(model: nn.Module, call: tuple, positional: int) -> Callable[[str], CacheEntry | None]:
    """``entry(form)``: the entry for capturing ``model`` for ``call`` (its ``calls.call_key``) in ``form``
    ("templated", "whole"); None when the cache is off or the model cannot be keyed. The model is keyed once."""
    base: list = []

    def entry(form: str) -> CacheEntry | None:
        if not base:
            base.append(_base_key(model, call, positional))
        if base[0] is None:
            return None
        key = json.dumps({**base[0], "form": form}, sort_keys=True, default=str)
        return CacheEntry(cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.capture", key)
    return entry


def _base_key(model: nn.Module, call: tuple, positional: int) -> dict[str, Any] | None:
    if not enabled() or _unkeyable(model):
        return None
    try:
        key = _key(model, call, positional)
        json.dumps(key, default=str)
        return key
    except Exception as e:
        _LOG.info("capture not cached: the model cannot be keyed (%s: %s)", type(e).__name__, e)
        return None


def _key(model: nn.Module, call: tuple, positional: int) -> dict[str, Any]:
    types = {type(m) for m in model.modules()}
    tensors = [(kind, name, tuple(t.shape), str(t.dtype), str(t.device))
               for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                                   ("b", model.named_buffers(remove_duplicate=False)))
               for name, t in items]
    return {
        "format": FORMAT, "versions": _versions(),
        "model": _qualname(type(model)),
        "sources": sorted(_source_digest(t) for t in types),
        "config": _config(model),
        "modules": hashlib.sha256(repr(model).encode()).hexdigest(),
        "tensors": hashlib.sha256(repr(tensors).encode()).hexdigest(),
        "modes": "".join("t" if m.training else "e" for m in model.modules()),
        "call": repr(call), "positional": positional,
    }


def _versions() -> dict[str, str]:
    from .. import __version__

    versions = {"lora_fx": __version__, "torch": torch.__version__, "python": platform.python_version()}
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        versions["transformers"] = getattr(transformers, "__version__", "?")
    return versions


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _source_digest(cls: type) -> str:
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        path = None
    if not path or not os.path.isfile(path):
        return f"{_qualname(cls)}:?"
    st = os.stat(path)
    return f"{_qualname(cls)}:{_file_digest(path, st.st_mtime_ns, st.st_size)}"


@functools.lru_cache(maxsize=1024)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]


def _config(model: nn.Module) -> list[str]:
    """Every config the model's modules hold (a wrapper's inner model's too), with the attention and experts
    implementations."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_json_string")}
    return [c.to_json_string(use_diff=False) + "|".join(str(getattr(c, name, None)) for name in (
        "_attn_implementation", "_experts_implementation")) for c in configs.values()]


def _unkeyable(model: nn.Module) -> bool:
    """A module whose forward is replaced on the instance, or that carries hooks: its graph depends on a
    function the key cannot name."""
    return any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _deserialize(stored: dict, model: nn.Module, args: tuple, kwargs: dict[str, Any]
                 ) -> torch.export.ExportedProgram:
    """The stored program over ``model``'s own tensors, with the example inputs (its ``module()`` checks a call's
    inputs against the program's guards from them) and the tracer's guards put back."""
    from torch._export.serde.serialize import ExportedProgramDeserializer

    own = _tensors(model)
    missing = [name for name in stored["tensors"] if name not in own]
    if missing:
        raise KeyError(f"the model has no tensor {missing[0]!r}")
    state = {name: own[name] for name in stored["tensors"]}
    ep = ExportedProgramDeserializer().deserialize(stored["program"], state, stored["constants"], (args, kwargs))
    if hasattr(ep, "_guards_code"):
        ep._guards_code = list(stored["guards"])
    for name in list(ep.constants):  # a constant that was one of the model's tensors is that tensor again
        value = own.get(stored["aliases"].get(name, name))
        if isinstance(value, torch.Tensor) and value.shape == ep.constants[name].shape:
            ep.constants[name] = value
    return ep


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _entries() -> list[Path]:
    folder = cache_dir()
    return list(folder.glob("*.capture")) if folder.is_dir() else []


def _evict(capacity: int) -> None:
    """Remove the least recently used entries until the folder holds at most ``capacity`` bytes."""
    entries = []
    for f in _entries():
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries):
        if total <= capacity:
            break
        f.unlink(missing_ok=True)
        total -= size
