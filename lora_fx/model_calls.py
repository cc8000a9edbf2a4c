"""Calling a LoraModel: the model's own signature (one lazily captured graph per combination of arguments, see
``signatures``), generation, and gradient checkpointing of its blocks.

Example::

    lm(input_ids=ids, attention_mask=mask, labels=ids).loss      # captured once for this combination
    lm.gradient_checkpointing_enable()
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .capture import Captured
from .capture.calls import CallSignature, call_key
from .errors import AdapterError
from .merge import HOLDER
from .passes import Rewrite, derive


class CallsMixin:
    """forward dispatch, generate and checkpointing for LoraModel (which provides the captures and the store)."""

    def _init_calls(self) -> None:
        cap: Captured = self._captured
        self._signature = CallSignature.of(cap.source) if cap.method == "export" else None
        self._programs: dict[tuple, list] = {}  # call key -> [Captured, the state version it was derived for]
        self._source_forward = cap.source.__dict__.get("forward")  # a forward set on the model after this: patched
        self._sharded = False  # lora_fx.fully_shard: only the first capture's graph runs
        forward = functools.partial(type(self).forward, self)
        functools.update_wrapper(forward, cap.source.forward)  # inspect.signature(lm.forward): the model's
        object.__setattr__(self, "forward", forward)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model's own forward with the adapters; ``adapter_names`` (one per row, ``"__base__"``: none)
        routes each row to its own adapter through the adapter bank (built on first use)."""
        self._set_route(adapter_names)
        if self._signature is None:
            return self.graph_module(*args, **kwargs)
        if self._captured.source.__dict__.get("forward") is not self._source_forward:
            return self._patched_forward(args, kwargs)
        call = self._signature.bind(args, kwargs)
        key = call_key(call)
        cap = self._captured if key == self._captured.call else self._program_for(key, call)
        positional = [call.pop(name) for name in self._signature.names[:cap.positional]]  # as it was captured
        return cap.graph_module(*positional, **call)

    def _program_for(self, key: tuple, call: dict[str, Any], module_path: str = "",
                     module: nn.Module | None = None) -> Captured:
        from .signatures import capture_call

        entry = self._programs.get((module_path, key))
        if entry is None and self._sharded:
            raise AdapterError("This LoraModel is sharded with FSDP2: it runs the graph captured by lorafy only. Call "
                               "it with the same arguments as the example inputs (names, dtypes, ranks), or lorafy "
                               "with example inputs like those of this call.")
        if entry is None:
            cap = capture_call(self._captured, call, len(self._programs) + 1, module_path, module)
            entry = self._programs[(module_path, key)] = [cap, -1]
        if entry[1] != self._version:
            self._derive_other(entry[0], strip=f"{module_path}." if module_path else "")
            entry[1] = self._version
        return entry[0]

    def _patched_forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The model's ``forward`` was replaced after capture (TRL's trainers patch in a fused LM head): run that
        forward, with the model's backbone (``base_model_prefix``) computed by a lora_fx graph of the backbone."""
        source = self._captured.source
        path = getattr(source, "base_model_prefix", "")
        backbone = source._modules.get(path) if path else None
        if backbone is None:
            raise AdapterError(f"{type(source).__name__}.forward was replaced after lorafy, and the model has no "
                               "backbone (base_model_prefix) for lora_fx to run under it; lorafy after patching.")
        outside = sorted({u.key for a in self.active_adapters for u in self.adapters.units(a).values()
                          if not u.key.startswith(path + ".") and a not in self.merged_adapters})
        if outside:
            raise AdapterError(f"{type(source).__name__}.forward was replaced after lorafy (a fused LM head?); the "
                               f"replacement runs {outside} itself, without their adapters. Target only modules "
                               f"inside {path!r}, or merge() first.")
        source._modules[path] = _BackboneRunner(self, path, backbone)
        try:
            return source.forward(*args, **kwargs)
        finally:
            source._modules[path] = backbone

    def _derive_other(self, cap: Captured, prefix: str = "", strip: str = "") -> None:
        """Derive another capture of this model (another call signature, a generation graph) from the same store;
        ``prefix``: where the model sits in that capture; ``strip``: where that capture's root sits in the model."""
        gm = cap.graph_module
        if getattr(gm, self._store_name, None) is not self.adapters:
            gm.add_module(self._store_name, self.adapters)  # the same store: training steps need no rebuild
        holder = getattr(self.graph_module, HOLDER, None)
        if holder is not None:
            gm.add_module(HOLDER, holder)
        rw = self._rewrite()
        saved = {prefix + p[len(strip):]: v for p, v in rw.saved.items() if p.startswith(strip)}
        derive(cap, Rewrite(rw.store, rw.store_name, rw.live, rw.fuse, saved, rw.untied))

    # ---- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, adapter_names: list[str] | None = None) -> torch.LongTensor:
        """Generate with the active adapters (unmerged or merged) over a static KV cache; returns the prompt plus
        the new tokens, as transformers' ``generate``. Left-padded batches take an ``attention_mask``; each row
        stops at EOS (``eos_token_id=None``: the model's generation config) and is padded after it with
        ``pad_token_id`` (default: the generation config's, else the first EOS, as transformers). Greedy by
        default; ``do_sample`` samples after temperature, top-k and top-p (seed with ``torch.manual_seed``).
        ``adapter_names`` (one per row, ``"__base__"``: none) generates each row with its own adapter, in one
        batch (adapter bank). LoRA dropout is off while generating. After ``lora_fx.compile(lm)`` the decode step
        is compiled once and reused by every step."""
        from .generation import generate
        from .sampling import SamplingConfig

        if adapter_names is not None and len(adapter_names) != len(input_ids):
            raise AdapterError(f"adapter_names has {len(adapter_names)} names for {len(input_ids)} rows of "
                               "input_ids; pass one adapter name per row.")
        self._set_route(adapter_names)
        was = self.training
        self.train(False)
        try:
            return generate(self, input_ids, attention_mask, max_new_tokens,
                            SamplingConfig(do_sample, temperature, top_k, top_p), eos_token_id, pad_token_id)
        finally:
            self.train(was)

    # ---- checkpointing ---------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """Recompute each block in backward instead of keeping its activations (non-reentrant
        ``torch.utils.checkpoint``; dropout masks are replayed, so gradients equal those without).
        transformers' keyword arguments are accepted; checkpointing is always non-reentrant and per block."""
        if not self._captured.blocks:
            raise AdapterError(f"{type(self._captured.source).__name__} was captured as one graph (it has no repeated "
                               "blocks lora_fx could keep), so there is no block to checkpoint.")
        for block in self._captured.blocks.values():
            block.checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for block in self._captured.blocks.values():
            block.checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(b.checkpointing for b in self._captured.blocks.values())

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs: Any) -> None:
        """transformers' newer name for ``gradient_checkpointing_enable`` (what ``Trainer`` calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing


class _BackboneRunner(nn.Module):
    """Stands in for the model's backbone during a patched forward: calls the backbone's lora_fx graph."""

    def __init__(self, lm: nn.Module, path: str, backbone: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_lm", lm)  # not a submodule: no cycle in the module tree
        object.__setattr__(self, "_backbone", backbone)
        self._path = path

    def __getattr__(self, name: str) -> Any:  # the backbone's own attributes (get_input_embeddings, config, ...)
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self.__dict__["_backbone"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        signature = CallSignature.of(self._backbone)
        call = signature.bind(args, kwargs)
        cap = self._lm._program_for(call_key(call), call, self._path, self._backbone)
        positional = [call.pop(name) for name in signature.names[:cap.positional]]
        return cap.graph_module(*positional, **call)
