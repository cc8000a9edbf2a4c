"""Deployment as compiled artifacts: AOTInductor packages (``.pt2``: compiled C++ kernels plus weights) that run
with no Python model code and no lora_fx, merged or with the LoRA branches kept and their tensors swappable.

- ``package(gm_or_lm, path, example_inputs=...)``: ``torch.export`` (every dimension dynamic, as ``export``),
  then ``torch._inductor.aoti_compile_and_package``, written through a temporary file (a killed packaging leaves
  no partial ``.pt2``). A merged graph (``lm.merge_and_unload()``, or a LoraModel after ``merge()``) packages the
  plain model; an unmerged LoraModel keeps ``y = W x + s·B A x`` with each adapter's A and B as named package
  constants, and records in the archive (``lora_fx/adapters.json``) which constant holds which PEFT tensor.
- a LoraModel with an adapter bank (``build_adapter_bank``) packages routed: every adapter's tensors stacked as
  constants and the per-row adapter index an input, ``loaded(ids, lora_route=route(path, names))``, so one
  package serves many adapters in one batch;
- ``swap_adapter(loaded, path, adapter_dir)``: a PEFT adapter directory into a package loaded with
  ``torch._inductor.aoti_load_package(path)``, through its ``load_constants`` (no compilation): the same targets
  (a subset zeroes the others), any rank up to the packaged one (A and B padded with zeros), any alpha (the
  packaged scale is fixed, so B is scaled by ``s_new / s_packaged``: ``s_p · (s_n/s_p) B A = s_n B A``).

C++: ``torch::inductor::AOTIModelPackageLoader(path)`` runs the same file (``.run(inputs)``; its
``load_constants`` swaps adapters the same way).

Example::

    lora_fx.package(lm, "served.pt2", example_inputs=(ids,))            # unmerged, adapters swappable
    loaded = torch._inductor.aoti_load_package("served.pt2")
    lora_fx.swap_adapter(loaded, "served.pt2", "other_adapter/")
    logits = loaded(ids).logits
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.store import BASE
from ..atomic import temp_write
from ..capture import export_program
from ..errors import AdapterError, CheckpointError
from ..model.calls import batch_rows
from ..passes.derive import ROUTE_INPUT
from ..peft.checkpoint import PREFIX, read_config, read_tensors
from ..peft.config import ruleset_from_peft_config

MANIFEST = "lora_fx/adapters.json"


def package(module: nn.Module, path: str | os.PathLike, example_inputs: tuple = (),
            example_kwargs: dict[str, Any] | None = None) -> Path:
    """An AOTInductor package of ``module`` (a merged graph, or a LoraModel: merged or not) at ``path``."""
    path = Path(path)
    lora = hasattr(module, "adapters")  # a LoraModel (an exported graph module has no train()/eval())
    routed = lora and module.state.bank is not None and module.state.merge is None
    manifest = routed_manifest(module) if routed else adapter_manifest(module) if lora else None
    target, kwargs = module, dict(example_kwargs or {})
    if routed:  # its graph, with the per-row route as an input
        target = module.graph_module
        rows = batch_rows(tuple(example_inputs), kwargs)
        if rows is None:
            raise AdapterError("package: a routed package needs a batched tensor among the example inputs.")
        kwargs[ROUTE_INPUT] = module.state.bank.route(module.state.bank.slots[0], None).expand(rows).clone()
    was = module.training
    if lora:
        module.eval()  # a package serves: no dropout
    try:
        with module.reading() if lora else contextlib.nullcontext(), _bank_as_constants():
            program = export_program(target, tuple(example_inputs), kwargs)
    finally:
        if lora:
            module.train(was)
    constant_names(manifest, program)
    return write_package(program, path, {MANIFEST: manifest} if manifest is not None else {})


def write_package(program: torch.export.ExportedProgram, path: Path, files: dict[str, dict]) -> Path:
    """``program`` compiled by AOTInductor into the package ``path`` with ``files`` (name -> JSON) beside it in the
    archive, through a temporary file (a killed build leaves no partial package)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with _bank_as_constants():
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        with zipfile.ZipFile(tmp, "a") as archive:  # inside the archive's root folder, as the loader expects
            root = archive.namelist()[0].split("/")[0]
            for name, content in files.items():
                archive.writestr(f"{root}/{name}", json.dumps(content, indent=1))
    os.replace(temp_write(path, write), path)
    return path


def constant_names(manifest: dict[str, Any] | None, program: torch.export.ExportedProgram) -> None:
    """Name each unit's A and B in ``manifest`` by the package constant that holds it (by identity until now)."""
    if manifest is None:
        return
    fqns = {id(t): name for name, t in program.state_dict.items()}
    for entry in manifest["units"]:
        entry["a_constant"], entry["b_constant"] = fqns[entry.pop("a_id")], fqns[entry.pop("b_id")]


@contextlib.contextmanager
def _bank_as_constants():
    """An adapter bank's stacked tensors (buffers the units train through as views) become package constants, as
    meant: torch's notes about their gradients are not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*requires gradient but it's not properly registered")
        warnings.filterwarnings("ignore", message=".*a Tensor that is not a leaf Tensor is being accessed")
        yield


def routed_manifest(lm: Any) -> dict[str, Any]:
    """A routed package's slots: row ``i`` runs adapter ``slots[route[i]]`` (``len(slots)``: the base)."""
    return {"routed": True, "route_input": ROUTE_INPUT, "slots": list(lm.state.bank.slots), "units": []}


def route(path: str | os.PathLike, adapter_names: list[str]) -> torch.Tensor:
    """The ``lora_route`` input of a routed package for one adapter name per row (``"__base__"``: none)."""
    manifest = read_manifest(path)
    if not manifest.get("routed"):
        raise AdapterError(f"{path} is not a routed package; it runs its one adapter for every row.")
    slots = manifest["slots"]
    unknown = sorted({n for n in adapter_names if n not in slots and n != BASE})
    if unknown:
        raise AdapterError(f"adapter_names {unknown} are not in {path} (its adapters: {slots}, or {BASE!r}).")
    return torch.tensor([len(slots) if n == BASE else slots.index(n) for n in adapter_names], dtype=torch.long)


def adapter_manifest(lm: Any) -> dict[str, Any] | None:
    """Which package constant will hold which adapter tensor (by identity until export names them), for an
    unmerged LoraModel; None when its graph has no LoRA branch (merged, or no active adapter)."""
    state = lm.state
    if state.merge is not None or not state.active:
        return None
    if len(state.active) > 1:
        raise AdapterError(f"package: adapters {list(state.active)} are active; set_adapter(one) first, or merge().")
    units = []
    for unit in state.entry(state.active[0]).by_key.values():
        if unit.variant.name != "lora":
            raise AdapterError(f"package: {unit.key!r} is {unit.variant.label}; an unmerged package swaps plain LoRA "
                               "tensors only. merge() first to package it merged.")
        names = {suffix: f"{PREFIX}{unit.peft_key}.{suffix}" for suffix in (unit.strategy.peft_a,
                                                                             unit.strategy.peft_b)}
        units.append({"key": unit.key, "kind": unit.kind, "r": unit.r, "scaling": unit.scaling,
                      "a_name": names[unit.strategy.peft_a], "b_name": names[unit.strategy.peft_b],
                      "a_shape": list(unit.lora_A.shape), "b_shape": list(unit.lora_B.shape),
                      "dtype": str(unit.lora_A.dtype).removeprefix("torch."), "device": str(unit.lora_A.device),
                      "a_id": id(unit.lora_A), "b_id": id(unit.lora_B)})
    return {"adapter": state.active[0], "units": units}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter map a ``package(..., unmerged LoraModel)`` wrote into the archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/{MANIFEST}") or n == MANIFEST), None)
            if name is None:
                raise KeyError(MANIFEST)
            return json.loads(archive.read(name))
    except KeyError:
        raise AdapterError(f"{path} has no LoRA branches to swap (packaged merged, or not by lora_fx.package).") \
            from None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable package ({e}).") from None


@torch.no_grad()
def swap_adapter(loaded: Any, path: str | os.PathLike, adapter_dir: str | os.PathLike) -> None:
    """Load the PEFT adapter in ``adapter_dir`` into ``loaded`` (``aoti_load_package(path)``) without compiling;
    see the module docstring. Everything is checked before the first constant is replaced."""
    manifest, directory = read_manifest(path), Path(adapter_dir)
    if manifest.get("routed"):
        raise AdapterError(f"{path} is a routed package (its adapters {manifest['slots']} stacked in a bank); "
                           "swap_adapter replaces the adapter of an unmerged one-adapter package.")
    config, tensors = read_config(directory), read_tensors(directory)
    ruleset = ruleset_from_peft_config(config)
    known = {n for u in manifest["units"] for n in (u["a_name"], u["b_name"])}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise CheckpointError(f"{directory}: tensors {unknown[:4]} have no place in {path} (its targets: "
                              f"{sorted(u['key'] for u in manifest['units'])[:4]}...); package a model with them.")
    constants = {}
    for u in manifest["units"]:
        a, b = tensors.get(u["a_name"]), tensors.get(u["b_name"])
        like = {"dtype": getattr(torch, u["dtype"]), "device": torch.device(u["device"])}
        pad_a, pad_b = torch.zeros(u["a_shape"], **like), torch.zeros(u["b_shape"], **like)
        if a is not None or b is not None:
            if a is None or b is None:
                raise CheckpointError(f"{directory}: {u['key']!r} has only one of lora_A / lora_B.")
            r = a.shape[0]
            if r > u["r"] or tuple(a.shape[1:]) != tuple(u["a_shape"][1:]) or b.shape[0] != u["b_shape"][0] or (
                    b.shape[1] != r):
                raise CheckpointError(f"{directory}: {u['key']!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; the "
                                      f"package holds rank {u['r']} with A {tuple(u['a_shape'])} and B "
                                      f"{tuple(u['b_shape'])}: same feature sizes, rank at most {u['r']}.")
            rule = ruleset.decide(u["key"], u["kind"])
            if rule is None or rule.exclude:
                raise CheckpointError(f"{directory}: its config does not target {u['key']!r}, yet it holds its "
                                      "tensors.")
            scale = ruleset.effective(rule, u["key"]).scaling / u["scaling"]
            pad_a[:r] = a.to(torch.float32)
            pad_b[:, :r] = b.to(torch.float32) * scale
        constants[u["a_constant"]], constants[u["b_constant"]] = pad_a, pad_b
    loaded.load_constants(constants, check_full_update=False)


def package_model_dir(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                      unmerged: bool = False, force: bool = False, progress: bool = True) -> Path:
    """``lora-fx package``: the model in ``base`` with the PEFT adapter in ``adapter``, merged (or ``unmerged``:
    adapters swappable) into the package ``out``; one line per phase on stderr."""
    import sys

    from ..api import from_peft
    from .merge_dir import load_model_dir

    def say(line: str) -> None:
        if progress:
            print(f"lora-fx package: {line}", file=sys.stderr, flush=True)
    out = Path(out)
    if out.is_dir() or (out.exists() and not force):
        raise CheckpointError(f"--out {out} exists{' and is a directory' if out.is_dir() else ''}; choose a new "
                              "file" + ("" if out.is_dir() else " or pass --force") + ".")
    say(f"capture {base} with {adapter}")
    ids = torch.zeros((2, 8), dtype=torch.long)  # no dimension of size 1: export would fix it
    lm = from_peft(load_model_dir(Path(base)), adapter, example_inputs=(ids,))
    if not unmerged:
        say("merge")
        lm.merge(safe=True)
    say("compile and write (AOTInductor: about 20 s for a small model)")
    return package(lm, out, example_inputs=(ids,))
