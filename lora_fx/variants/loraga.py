"""LoRA-GA (PEFT's ``init_lora_weights="lora_ga"`` with ``lora_ga_config``): A and B from the SVD of the loss
gradient of W, so the first steps move as full fine-tuning would. ``preprocess_loraga`` averages ``∂L/∂W`` of each
target over a few batches (kept on the module as PEFT's ``_peft_loraga_grad``; PEFT's own ``preprocess_loraga``
works too); adding the adapter then takes, with ``G ≈ U S Vᵀ`` (``torch.svd_lowrank``, q = min(4r, ...))::

    direction "ArB2r": A = Vᵀ[:r],  B = U[:, r:2r] S[r:2r]     ("A2rBr", "ArBr", "random": other index sets)
    scale "stable": B · out^¼ / √gamma;  "weight_svd": B · σ₁(W) / S_B[0];  "gd_scale": A, B / s;  "unit": as is
    the base weight becomes W - s·B A, so outputs start unchanged (merge folds back to W)

exactly as PEFT computes it. A target without a gradient (an adapter loaded from a file) gets PEFT's fallback:
kaiming A, zero B, base untouched. Linear weights (Conv1D too); not routable or combinable.

Example::

    lora_fx.preprocess_loraga(model, config, batches)        # or a train_step callable, as PEFT's
    lm = lora_fx.lorafy(model, config, example_inputs=(ids,))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import RuleError
from .base import Variant
from .gathered import linear_targets

GRAD = "_peft_loraga_grad"  # PEFT's attribute on the target module


class LoraGA(Variant):
    name = "lora_ga"
    label = "LoRA-GA"
    field = "init_lora_weights='lora_ga'"
    routable = combinable = False

    def __init__(self, direction: str, scale: str, gamma: int) -> None:
        self.direction, self.scale, self.gamma = direction, scale, gamma

    def params(self) -> tuple:
        return (self.direction, self.scale, self.gamma)





    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.left or geometry.quant:
            raise RuleError(f"init='lora_ga' on {key!r}: LoRA-GA takes A and B from a full-precision linear weight's "
                            f"gradient (this is a {kind.name}{' with a quantized base' if geometry.quant else ''}); "
                            "use init='default' for it.")

    @torch.no_grad()
    def residual(self, unit, weight, source=None):
        grad = getattr(source, GRAD, None)
        if grad is None:  # PEFT's fallback (a loaded adapter: its tensors come from the file)
            unit.strategy.reset(unit, True)
            return None
        transposed, r, s = unit.geometry.transposed, unit.r, unit.scaling
        g = grad.to(torch.float32)
        g = g.T if transposed else g
        u, sv, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        vh, u, sv = v.t()[:2 * r], u[:, :2 * r], sv[:2 * r]
        if self.direction == "ArBr":
            a, b, s_b = vh[1:2 * r:2], u[:, 0:2 * r:2], sv[0:2 * r:2]
        elif self.direction == "A2rBr":
            a, b, s_b = vh[r:2 * r], u[:, :r], sv[:r]
        elif self.direction == "ArB2r":
            a, b, s_b = vh[:r], u[:, r:2 * r], sv[r:2 * r]
        else:
            index = torch.randperm(2 * r)[:r]
            a, b, s_b = vh[index], u[:, index], sv[index]
        b = b @ torch.diag(s_b)
        w = weight.detach().to(torch.float32)
        w = w.T if transposed else w
        if self.scale == "stable":
            b = b * (w.shape[0] ** 0.25 / self.gamma ** 0.5)
        elif self.scale == "weight_svd":
            _, w_s, _ = torch.svd_lowrank(w, q=r, niter=4)
            if s_b[0] > 0:
                b = b * (w_s[0] / s_b[0])
        elif self.scale == "gd_scale":
            a, b = a / s, b / s
        unit.lora_A.copy_(a.to(unit.lora_A.dtype).contiguous())
        unit.lora_B.copy_(b.to(unit.lora_B.dtype).contiguous())
        residual = (w - s * (unit.lora_B.float() @ unit.lora_A.float())).to(weight.dtype)
        return residual.T if transposed else residual

    def peft_config_fields(self):
        return {"lora_ga_config": {"direction": self.direction, "scale": self.scale, "stable_gamma": self.gamma}}


def preprocess_loraga(model: nn.Module, rules: Any, data: Callable[[], Any] | Iterable[Any],
                      cache_file: str | os.PathLike | None = None) -> None:
    """Average ``∂L/∂W`` of every target ``rules`` select (a LoraConfig, Rules) and keep it on its module for
    ``init="lora_ga"``. ``data``: PEFT's ``train_step`` (a callable running forward and backward), or batches (dicts
    of keyword arguments or tensors) whose loss (``out.loss``, or the output itself) is backpropagated. Only the
    target weights get gradients; ``cache_file`` stores them (read instead of computing when it exists).

    Example::

        preprocess_loraga(model, LoraConfig(..., init_lora_weights="lora_ga"), [{"input_ids": ids, "labels": ids}])
    """
    targets = linear_targets(model, rules, "preprocess_loraga")
    for name, module in targets:
        if hasattr(module, "quant_state") or getattr(module.weight, "quant_state", None) is not None:
            raise RuleError(f"preprocess_loraga: {name!r} is quantized; LoRA-GA needs full-precision gradients.")
    if cache_file is not None and Path(cache_file).is_file() and Path(cache_file).stat().st_size > 0:
        device = next(model.parameters()).device
        cache = torch.load(cache_file, map_location=device, weights_only=True)
        for name, module in targets:
            setattr(module, GRAD, cache[f"{name}.{GRAD}"])
        return
    _estimate(model, targets, data)
    if cache_file is not None:
        cache = {f"{name}.{GRAD}": getattr(module, GRAD) for name, module in targets}
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(cache_file), lambda tmp: torch.save(cache, tmp))


def _estimate(model: nn.Module, targets: list[tuple[str, nn.Module]], data: Any) -> None:
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    counts = {id(m): 0 for _, m in targets}
    hooks = [m.register_full_backward_hook(lambda mod, gi, go: counts.__setitem__(id(mod), counts[id(mod)] + 1))
             for _, m in targets]
    model.train()
    try:
        for p in flags:
            p.requires_grad_(False)
        for _, m in targets:
            m.weight.requires_grad_(True)
            m.weight.grad = None
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen inputs: expected
            if callable(data):
                data()
            else:
                for batch in data:
                    out = model(**batch) if isinstance(batch, dict) else model(batch)
                    loss = getattr(out, "loss", None)
                    (out if loss is None else loss).backward()
        for _, m in targets:
            if counts[id(m)] > 0:
                setattr(m, GRAD, m.weight.grad.detach() / counts[id(m)])
    finally:
        for h in hooks:
            h.remove()
        for _, m in targets:
            m.weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
