"""Calling a LoraModel: the model's own signature (one lazily captured graph per combination of arguments, see
``capture.signatures``), per-row routing, generation, and gradient checkpointing of its blocks.

A call runs the graphs of one committed state: it holds ``reading()`` while they run (no verb commits meanwhile),
and a graph derived for an older state is derived again first. ``adapter_names`` travels with the call as the
graphs' ``lora_route`` input; nothing about one call is stored where another call could see it.

Example::

    lm(input_ids=ids, attention_mask=mask, labels=ids).loss      # captured once for this combination
    lm(ids, adapter_names=["a", "b"])                            # row 0 with adapter a, row 1 with b
    lm.gradient_checkpointing_enable()
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ..adapters.store import BASE
from ..capture.calls import CallSignature, call_key
from ..capture.signatures import capture_call
from ..errors import AdapterError, CaptureError, RuleWarning
from ..passes.derive import ROUTE_INPUT
from .transaction import SimpleLock


class CallsMixin:
    """forward dispatch, generate and checkpointing for LoraModel (which provides the state and ``derived``)."""

    def _init_calls(self) -> None:
        cap = self._state.captured
        self._signature = CallSignature.of(cap.source) if cap.method == "export" else None
        self._base_training = cap.training
        self._source_forward = cap.source.__dict__.get("forward")  # a forward set on the model after this: patched
        self._patch_lock = SimpleLock()  # a patched forward swaps the model's backbone for the call's span
        self._own_generate = False  # lm.generate fell back to the model's own generate (warned once)
        self._capture_ids = itertools.count(1)
        self._compiled_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> its compile
        forward = functools.partial(type(self).forward, self)
        functools.update_wrapper(forward, cap.source.forward)  # inspect.signature(lm.forward): the model's
        object.__setattr__(self, "forward", forward)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model's own forward with the adapters; ``adapter_names`` (one per row, ``"__base__"``: none)
        routes each row to its own adapter through the adapter bank (built on first use)."""
        if adapter_names is not None:
            self._check_route(adapter_names, batch_rows(args, kwargs))
        if self._signature is None:
            return self.run_entry(None, lambda route: self.runner(self.graph_module)(*args, **kwargs, **route),
                                  adapter_names, batch_rows(args, kwargs))
        if self._state.captured.source.__dict__.get("forward") is not self._source_forward:
            return self._patched_forward(args, kwargs, adapter_names)
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
            raise AdapterError("use_cache=True / past_key_values: lora_fx's forward graphs are captured without a KV "
                               "cache (the cache objects are not graph values); call lm(...) without them, and use "
                               "lm.generate(...) for cached decoding (its graph runs over a static cache).")
        call = self._signature.bind(args, kwargs)
        key, mode = call_key(call), self.base_mode
        cap = self._state.captured
        entry = None if key == cap.call and mode == cap.training else self.call_entry(("call", key, mode), call,
                                                                                       training=mode)
        target = cap if entry is None else entry.cap
        positional = [call.pop(name) for name in self._signature.names[:target.positional]]  # as it was captured
        return self.run_entry(entry, lambda route: self.runner(target.graph_module)(*positional, **call, **route),
                              adapter_names, batch_rows(args, kwargs))

    def runner(self, gm: nn.Module) -> Any:
        """``gm``, or its ``torch.compile`` when ``lora_fx.compile`` compiled this model whole: the graphs are
        compiled, not this wrapper, so nothing guards on adapter names, routes or the active adapter."""
        options = self._state.options.graph_compile
        if options is None or torch.compiler.is_compiling():
            return gm
        compiled = self._compiled_graphs.get(gm)
        if compiled is None:
            compiled = self._compiled_graphs.setdefault(gm, torch.compile(gm, **options))
        return compiled

    def run_entry(self, entry: Any, run: Any, adapter_names: list[str] | None, rows: int | None = None) -> Any:
        """``run(route_kwargs)`` on the graphs of the committed state (``run_state``); the route is computed
        there, from the state the graphs belong to."""
        return self.run_state(entry, lambda: run(self._route(adapter_names, rows)))

    def _route(self, adapter_names: list[str] | None, rows: int | None = None) -> dict[str, Any]:
        """The call's ``lora_route`` keyword (none when the graphs are not routed). Compiled whole, a call without
        ``adapter_names`` passes its default route one entry per row (``rows``), shaped as a routed call's, so the
        two share one compiled graph."""
        bank = self._state.bank
        if bank is None:
            return {}
        if adapter_names is None:
            active = self._state.active
            if len(active) > 1:
                raise AdapterError(f"Adapters {list(active)} are active and the adapter bank gives each row one "
                                   "adapter; pass adapter_names=[one per row] or set_adapter(one name).")
            route = bank.default_route if active else bank.route(BASE)
            if rows and self._state.options.graph_compile is not None and route.numel() == 1:
                route = route.repeat(rows)
            return {ROUTE_INPUT: route}
        return {ROUTE_INPUT: bank.route(adapter_names)}

    @property
    def base_mode(self) -> bool:
        """The mode the base graph runs in: an exported model that behaves differently in training (dropout,
        BatchNorm, ``self.training`` branches) runs a capture of the mode set by ``train()`` / ``eval()``; until
        one is called, the mode the model had when captured (as PEFT leaves the base model's modules)."""
        cap = self._state.captured
        return self._base_training if cap.mode_dependent else cap.training

    def call_entry(self, key: tuple, call: dict[str, Any], module_path: str = "",
                   module: nn.Module | None = None, training: bool | None = None) -> Any:
        """The derived capture for a call of another signature or mode (of the model, or of its backbone)."""
        def capture() -> Any:
            if self._state.options.sharded:
                raise AdapterError("This LoraModel is sharded with FSDP2: it runs the graph captured by lorafy only. "
                                   "Call it with the same arguments as the example inputs (names, dtypes, ranks), or "
                                   "lorafy with example inputs like those of this call.")
            return capture_call(self._state.captured, call, next(self._capture_ids), module_path, module, training)
        return self.derived(key, capture, strip=f"{module_path}." if module_path else "")

    def _patched_forward(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None) -> Any:
        """The model's ``forward`` was replaced after capture (TRL's trainers patch in a fused LM head): run that
        forward, with the model's backbone (``base_model_prefix``) computed by a lora_fx graph of the backbone."""
        source = self._state.captured.source
        path = getattr(source, "base_model_prefix", "")
        backbone = getattr(source, path, None) if path else None
        if not isinstance(backbone, nn.Module):
            raise AdapterError(f"{type(source).__name__}.forward was replaced after lorafy, and the model has no "
                               "backbone (base_model_prefix) for lora_fx to run under it; lorafy after patching.")
        state = self._state
        outside = sorted({u.key for a in state.live for u in state.entries[a].by_key.values()
                          if not u.key.startswith(path + ".")})
        if outside:
            raise AdapterError(f"{type(source).__name__}.forward was replaced after lorafy (a fused LM head?); the "
                               f"replacement runs {outside} itself, without their adapters. Target only modules "
                               f"inside {path!r}, or merge() first.")
        with self._patch_lock:
            setattr(source, path, _BackboneRunner(self, path, backbone, adapter_names))
            try:
                return source.forward(*args, **kwargs)
            finally:
                setattr(source, path, backbone)

    # ---- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, adapter_names: list[str] | None = None,
                 generation_config: Any = None, **kwargs: Any) -> Any:
        """Generate with the active adapters (unmerged or merged); returns what transformers' ``generate`` returns
        (the prompt plus the new tokens). Greedy and sampling (temperature, top-k, top-p; seed with
        ``torch.manual_seed``) with per-row EOS and padding, ``adapter_names`` (one per row, ``"__base__"``: none,
        one batch through the adapter bank) and the default 20 new tokens run lora_fx's graph over a static KV
        cache (after ``lora_fx.compile(lm)``, compiled once and reused). Any other transformers argument
        (``num_beams``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``logits_processor``,
        ``stopping_criteria``, ``streamer``, ``return_dict_in_generate``, ...), a ``generation_config``, an
        encoder-decoder, or a model whose cache the graphs cannot hold (state-space and hybrid models) runs the
        model's own ``generate`` with the adapters added to its layers as PEFT adds them (``generation.eager``).
        LoRA dropout is off while generating."""
        from ..generation.generate import generate
        from ..generation.sampling import SamplingConfig

        model, state = self._state.captured.source, self._state
        own = generation_config is not None or bool(kwargs) or input_ids is None or getattr(
            getattr(model, "config", None), "is_encoder_decoder", False) or any(
            not u.variant.decodes for n in state.active for u in state.entries[n].by_key.values())
        if adapter_names is not None:
            if own:
                raise AdapterError("adapter_names (one adapter per row) runs on lm.generate's own graphs, which take "
                                   f"greedy and sampling arguments only; drop {sorted(kwargs) or 'generation_config'} "
                                   "or adapter_names.")
            self._check_route(adapter_names, len(input_ids) if isinstance(input_ids, torch.Tensor) else None)
        hf_args = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": max_new_tokens,
                   "do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "generation_config": generation_config,
                   **kwargs}
        was = self.training, self._base_training
        self.train(False)
        try:
            if own:
                return self._transformers_generate({k: v for k, v in hf_args.items() if v is not None})
            sampling = SamplingConfig(bool(do_sample), 1.0 if temperature is None else temperature, top_k, top_p)
            try:
                return generate(self, input_ids, attention_mask, 20 if max_new_tokens is None else max_new_tokens,
                                sampling, eos_token_id, pad_token_id, adapter_names)
            except CaptureError as e:
                if adapter_names is not None:  # the model's own generate has no per-row adapters
                    raise CaptureError(f"adapter_names (one adapter per row) runs on lm.generate's graphs, which "
                                       f"cannot run this call: {e}. Drop adapter_names or shorten the call.") from e
                if not self._own_generate:
                    self._own_generate = True
                    warnings.warn(f"lm.generate: its static-cache graphs cannot run {type(model).__name__} "
                                  f"({str(e).splitlines()[0][:240]}); generating with the model's own generate and "
                                  "the adapters added to its layers instead.", RuleWarning, stacklevel=2)
                return self._transformers_generate({k: v for k, v in hf_args.items() if v is not None})
        finally:
            self.train(was[0])
            self._base_training = was[1]

    def _transformers_generate(self, args: dict[str, Any]) -> Any:
        from ..generation.eager import attached

        model = self._state.captured.source
        if not callable(getattr(model, "generate", None)):
            raise AdapterError(f"{type(model).__name__} has no generate method; transformers' generation arguments "
                               "need a transformers model.")
        with self.reading(), self._patch_lock:
            training = model.training
            model.eval()
            try:
                with attached(self, {"input_ids": args.get("input_ids")}):
                    return model.generate(**args)
            finally:
                model.train(training)

    def _check_route(self, adapter_names: Any, rows: int | None) -> None:
        """Refuse a bad ``adapter_names`` before anything happens; then build the bank if there is none."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise AdapterError("adapter_names takes one adapter name per row of the batch (a list), not "
                               f"{type(adapter_names).__name__}.")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self._state.entries}, key=str)
        if unknown:
            raise AdapterError(f"adapter_names names {unknown}, which are not in the adapter bank (this model's "
                               f"adapters: {self._state.names}, or '{BASE}' for none); nothing ran.")
        if rows is not None and len(adapter_names) != rows or not adapter_names:
            raise AdapterError(f"adapter_names has {len(adapter_names)} names for {rows} rows of the batch; pass one "
                               "adapter name per row.")
        if self._state.bank is None:
            self.build_adapter_bank()

    def route_kwargs(self, adapter_names: list[str] | None) -> dict[str, Any]:
        """The ``lora_route`` keyword a derived graph of the committed state takes for ``adapter_names``."""
        return self._route(adapter_names)

    # ---- checkpointing ---------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """Recompute each block in backward instead of keeping its activations (non-reentrant
        ``torch.utils.checkpoint``; dropout masks are replayed, so gradients equal those without).
        transformers' keyword arguments are accepted; checkpointing is always non-reentrant and per block."""
        cap = self._state.captured
        if not cap.blocks:
            raise AdapterError(f"{type(cap.source).__name__} was captured as one graph (it has no repeated "
                               "blocks lora_fx could keep), so there is no block to checkpoint.")
        for block in cap.blocks.values():
            block.checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for block in self._state.captured.blocks.values():
            block.checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(b.checkpointing for b in self._state.captured.blocks.values())

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

    def __init__(self, lm: nn.Module, path: str, backbone: nn.Module, adapter_names: list[str] | None) -> None:
        super().__init__()
        object.__setattr__(self, "lm", lm)  # not a submodule: no cycle in the module tree
        object.__setattr__(self, "backbone", backbone)
        self.path, self.adapter_names = path, adapter_names

    def __getattr__(self, name: str) -> Any:  # the backbone's own attributes (get_input_embeddings, config, ...)
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self.__dict__["backbone"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        signature = CallSignature.of(self.backbone)
        call = signature.bind(args, kwargs)
        mode = self.lm.base_mode
        entry = self.lm.call_entry(("backbone", self.path, call_key(call), mode), call, self.path, self.backbone,
                                   mode)
        positional = [call.pop(name) for name in signature.names[:entry.cap.positional]]
        return self.lm.run_entry(entry, lambda route: entry.cap.graph_module(*positional, **call, **route),
                                 self.adapter_names)


def batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a call: the first dimension of its first tensor argument (None: no tensor)."""
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
    return None if first is None else first.shape[0]
