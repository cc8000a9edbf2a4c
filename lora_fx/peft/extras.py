"""What PEFT's adapter files hold besides LoRA tensors, both ways: embedding base weights and the LoRA on a
``nn.MultiheadAttention``'s ``out_proj``.

**Embedding base weights.** PEFT's ``save_embedding_layers="auto"`` (its default) saves the model's input and
output embedding weights beside the adapter when ``embed_tokens`` or ``lm_head`` is among the targets:
``<key>.base_layer.weight`` for a targeted one, ``<path>.weight`` for one that is not (``True`` saves both
always). Loading copies them into the base model, as PEFT does (a fine-tune with a resized vocabulary needs
them); a shape that differs from the model's is refused.

**MultiheadAttention.** PEFT adapts the packed q/k/v projection under the attention module's own key
(``attn.lora_A.weight``, B ``[3·E, r]``), which lora_fx reproduces. PEFT reads ``out_proj`` only by merging
into its weight (``attn.base_layer.out_proj.lora_*``): an ``out_proj`` LoRA targeted alone is ignored by PEFT's
forward, and peft <= 0.21 merges the wrapped one twice. lora_fx refuses to save an ``out_proj`` adapter inside
a MultiheadAttention, and reads a PEFT one only when its B is zero (no effect either way).

Example::

    tensors.update(embedding_tensors(source, keys, "auto", graph_module))   # when saving
    tensors, pending = embedding_weights(tensors, source, graph_module, path)   # when loading
    copy_weights(pending)                                                      # once the adapter loaded
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, preview
from .checkpoint import PREFIX

EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES: what "auto" looks for


def _embedding_layers(source: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for the model's input and output embeddings (transformers' accessors)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(source, getter, None)
        try:
            layer = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):  # transformers raises for models without one (CLIP)
            layer = None
        if layer is not None:
            layers.append(layer)
    return {path: m for path, m in source.named_modules() if any(m is layer for layer in layers)}


def embedding_tensors(source: nn.Module, keys: set[str], mode: bool | str, graph: nn.Module) -> dict[str, object]:
    """PEFT name -> base weight for ``save_embedding_layers`` = ``mode`` ("auto", True or False)."""
    targeted = any(k.rpartition(".")[2] in EMBEDDING_NAMES for k in keys)
    if mode not in ("auto", True, False):
        raise CheckpointError(f"save_embedding_layers={mode!r}: use 'auto', True or False.")
    if not (mode is True or (mode == "auto" and targeted)):
        return {}
    out = {}
    for path in _embedding_layers(source):
        if targeted and path not in keys:
            continue  # PEFT saves only the targeted (wrapped) embeddings when any is targeted
        name = f"{PREFIX}{path}.base_layer.weight" if path in keys else f"{PREFIX}{path}.weight"
        out[name] = graph.get_parameter(f"{path}.weight")
    return out


def embedding_weights(tensors: dict[str, torch.Tensor], source: nn.Module, graph: nn.Module, origin: Path,
                      modules_to_save=()) -> tuple[dict[str, torch.Tensor], list[tuple[nn.Parameter, torch.Tensor]]]:
    """Split the embedding base weights a PEFT checkpoint holds from its other tensors: (the others, the
    ``(model weight, saved value)`` pairs to copy once everything else loaded; shapes checked here). A module in
    the config's ``modules_to_save`` keeps its tensors: they are its trained copy, not a base weight."""
    candidates = [n for n in tensors if n.startswith(PREFIX) and n.endswith(".weight") and ".lora_" not in n]
    layers = _embedding_layers(source) if candidates else {}
    found = {}
    for name in tensors:
        if not name.startswith(PREFIX) or not name.endswith(".weight"):
            continue
        path = name[len(PREFIX):-len(".weight")].removesuffix(".base_layer")
        saved = any(path == m or path.endswith("." + m) for m in modules_to_save or ())
        if path in layers and not saved:
            found[name] = graph.get_parameter(f"{path}.weight")
    for name, param in found.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{origin}: {name!r} has shape {tuple(tensors[name].shape)}, the model's embedding "
                                  f"is {tuple(param.shape)}; resize the model's token embeddings to the adapter's "
                                  "vocabulary (model.resize_token_embeddings) before loading it.")
    return {n: t for n, t in tensors.items() if n not in found}, [(p, tensors[n]) for n, p in found.items()]


@torch.no_grad()
def copy_weights(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, value in pairs:
        param.copy_(value)


def _mha_out_proj(source: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    if leaf != "out_proj":
        return False
    try:
        return isinstance(source.get_submodule(owner), nn.MultiheadAttention)
    except AttributeError:
        return False


def refuse_mha_out_proj(source: nn.Module, keys: set[str], origin: Path | None = None) -> None:
    """Refuse to save (or, from ``origin``, to load) LoRA on a MultiheadAttention's ``out_proj``, which PEFT would
    ignore or misapply."""
    bad = sorted(k for k in keys if _mha_out_proj(source, k))
    if bad and origin is not None:
        raise CheckpointError(
            f"{origin}: its config targets {preview(bad, 3)}, a MultiheadAttention's out_proj, whose forward PEFT "
            "never calls: in PEFT this adapter has no effect. lora_fx refuses it rather than apply what PEFT "
            "ignores; drop those keys from target_modules (or target the attention module itself).")
    if bad:
        raise CheckpointError(
            f"Cannot save LoRA on {preview(bad, 3)} in PEFT's format: PEFT never calls a MultiheadAttention's "
            "out_proj forward (an adapter there loads with no effect, silently), and peft <= 0.21 applies the one "
            "it wraps twice. Target the attention module itself (its q/k/v projection) for a PEFT-loadable "
            "adapter, or merge_and_unload() to keep the out_proj update.")


def mha_out_proj_zeros(source: nn.Module, units: list) -> dict[str, torch.Tensor]:
    """Zero ``out_proj`` LoRA tensors for each targeted MultiheadAttention: PEFT wraps out_proj whenever it adapts
    the attention, and loads this file without a missing-keys warning; zeros add nothing."""
    out = {}
    for u in units:
        try:
            attn = source.get_submodule(u.key)
        except AttributeError:
            continue
        if isinstance(attn, nn.MultiheadAttention):
            e, p = attn.out_proj.in_features, f"{PREFIX}{u.key}.base_layer.out_proj"
            out[f"{p}.lora_A.weight"] = torch.zeros(u.r, e, dtype=u.lora_A.dtype)
            out[f"{p}.lora_B.weight"] = torch.zeros(attn.out_proj.out_features, u.r, dtype=u.lora_B.dtype)
    return out


def drop_mha_out_proj(tensors: dict[str, torch.Tensor], source: nn.Module, origin: Path) -> dict[str, torch.Tensor]:
    """Drop PEFT's ``<attn>.base_layer.out_proj.lora_*`` tensors when their B is zero (no effect); refuse a
    non-zero one, whose effect PEFT's own versions disagree on."""
    out = dict(tensors)
    for name in [n for n in tensors if ".base_layer.out_proj.lora_" in n]:
        owner = name[len(PREFIX):].split(".base_layer.out_proj.")[0]
        if not _mha_out_proj(source, f"{owner}.out_proj"):
            continue
        b = tensors.get(name.replace("lora_A", "lora_B"))
        if b is not None and bool(b.count_nonzero()):
            raise CheckpointError(
                f"{origin}: {name!r} is a trained LoRA on a MultiheadAttention's out_proj; peft <= 0.21 applies it "
                "twice (merged into the weight, then merged again), later versions once, so lora_fx will not guess. "
                "Merge it with the PEFT version that trained it (merge_and_unload) and capture the merged model.")
        del out[name]
    return out
