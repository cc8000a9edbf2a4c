"""CorDA (PEFT's ``init_lora_weights="corda"`` with ``corda_config``): A and B from the SVD of W times the covariance
of its inputs on sample data. ``preprocess_corda`` runs the model on the data with each target's input ``X``
(each call's tokens, divided by ``max(X)``) summed into ``C = mean XᵀX``, then keeps, as PEFT's ``eigens``::

    C' = C + d · mean(diag C) · I   (d = 0.01, doubled until C' C'⁻¹ is within 0.05 of I)
    W C' = U S Vhᵀ,  V = (Vh C'⁻¹)ᵀ;  "ipm": the r largest components, "kpm": the r smallest

Adding the adapter then sets ``A = Vᵀ √(S/s)``, ``B = U √(S/s)`` and the base keeps ``W - s·B A`` (outputs start
unchanged; merge folds back to W), as PEFT does. PEFT's own ``preprocess_corda`` result is read too. Without
``eigens`` on a target, adding or loading the adapter is refused, as PEFT refuses it. Linear weights (Conv1D too).

Example::

    lora_fx.preprocess_corda(model, config, batches)          # or PEFT's run_model callable
    lm = lora_fx.lorafy(model, config, example_inputs=(ids,))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import RuleError
from .base import Variant
from .gathered import linear_targets, rank_of

METHODS = ("ipm", "kpm")


@dataclass
class CordaEigens:
    """PEFT's ``CordaEigens``: the r components CorDA keeps for one module."""

    S_WC: torch.Tensor  # noqa: N815 (PEFT's names)
    U_WC: torch.Tensor  # noqa: N815
    V_WC: torch.Tensor  # noqa: N815


class Corda(Variant):
    name = "corda"
    label = "CorDA"
    field = "init_lora_weights='corda'"
    routable = combinable = False

    def __init__(self, method: str) -> None:
        self.method = method

    def params(self) -> tuple:
        return (self.method,)




    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.left or geometry.quant:
            raise RuleError(f"init='corda' on {key!r}: CorDA decomposes a full-precision linear weight (this is a "
                            f"{kind.name}{' with a quantized base' if geometry.quant else ''}); use init='default'.")

    @torch.no_grad()
    def residual(self, unit, weight, source=None):
        eigens = getattr(source, "eigens", None)
        key, r, s = unit.key, unit.r, unit.scaling
        if eigens is None:
            raise RuleError(f"init='corda' on {key!r}: the module has no CorDA eigens; run "
                            "lora_fx.preprocess_corda(model, config, data) on this model first (PEFT needs its "
                            "preprocess_corda too, also to load a CorDA adapter).")
        u, sv, v = eigens.U_WC.float(), eigens.S_WC.float(), eigens.V_WC.float()
        out, inn = unit.geometry.out_features, unit.geometry.in_features
        if tuple(u.shape) != (out, r) or tuple(sv.shape) != (r,) or tuple(v.shape) != (inn, r):
            raise RuleError(f"init='corda' on {key!r}: its eigens are U {tuple(u.shape)}, S {tuple(sv.shape)}, V "
                            f"{tuple(v.shape)} for out={out}, in={inn}, r={r}; run preprocess_corda with the same "
                            "model and ranks as the adapter (a cache file built for another rank does not fit).")
        if not all(torch.isfinite(t).all() for t in (u, sv, v)):
            raise RuleError(f"init='corda' on {key!r}: its eigens hold NaN or Inf; check the sample data.")
        root = (sv / s).sqrt()
        unit.lora_A.copy_((v.t() * root.view(-1, 1)).to(unit.lora_A.dtype))
        unit.lora_B.copy_((u * root).to(unit.lora_B.dtype))
        delta = s * (unit.lora_B.float() @ unit.lora_A.float())
        delta = delta.T if unit.geometry.transposed else delta
        return (weight.detach().float() - delta).to(weight.dtype)

    def peft_config_fields(self):
        return {"corda_config": {"corda_method": self.method}}


def preprocess_corda(model: nn.Module, rules: Any, data: Callable[[], Any] | Iterable[Any] | None = None, *,
                     method: str | None = None, cache_file: str | os.PathLike | None = None,
                     covariance_file: str | os.PathLike | None = None, float16: bool | None = None) -> None:
    """Gather each target's input covariance over ``data`` and keep its CorDA ``eigens`` on the module (see the
    module docstring). ``rules``: a LoraConfig (its ``corda_config`` gives the method, files and precision unless
    given here) or Rules. ``data``: PEFT's ``run_model`` callable, or batches (dicts of keyword arguments or
    tensors) run through the model in eval mode without grad. ``cache_file``: the eigens, ``covariance_file``: the
    covariances, each read instead of computed when it exists."""
    corda = _corda_config(rules)
    method = method or corda.get("corda_method") or "ipm"
    if method not in METHODS:
        raise RuleError(f"preprocess_corda: method must be one of {METHODS}, got {method!r}.")
    cache_file = cache_file or corda.get("cache_file")
    covariance_file = covariance_file or corda.get("covariance_file")
    float16 = bool(corda.get("use_float16_for_covariance", False)) if float16 is None else float16
    targets = linear_targets(model, rules, "preprocess_corda")
    device = next(model.parameters()).device
    if cache_file is not None and _exists(cache_file):
        cache = torch.load(cache_file, map_location=device, weights_only=True)
        for name, module in targets:
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{f}"] for f in ("S_WC", "U_WC", "V_WC")))
        return
    if covariance_file is not None and _exists(covariance_file):
        covariances = torch.load(covariance_file, map_location=device, weights_only=True)
    else:
        if data is None:
            raise RuleError("preprocess_corda needs data (batches or a run_model callable) unless its cache or "
                            "covariance file exists.")
        covariances = _covariances(model, targets, data, float16)
        if covariance_file is not None:
            _save(covariance_file, covariances)
    for name, module in targets:
        module.eigens = _eigens(module, covariances[name], rank_of(rules, name), method)
    if cache_file is not None:
        _save(cache_file, {f"{name}.eigens.{f}": getattr(module.eigens, f) for name, module in targets
                           for f in ("S_WC", "U_WC", "V_WC")})


def _corda_config(rules: Any) -> dict[str, Any]:
    value = getattr(rules, "corda_config", None)
    if value is None:
        return {}
    return dict(value) if isinstance(value, dict) else {k: getattr(value, k) for k in vars(value)}


def _exists(path: Any) -> bool:
    return Path(path).is_file() and Path(path).stat().st_size > 0


def _save(path: Any, tensors: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: torch.save(tensors, tmp))


@torch.no_grad()
def _covariances(model: nn.Module, targets: list, data: Any, float16: bool) -> dict[str, torch.Tensor]:
    sums: dict[str, Any] = {name: 0 for name, _ in targets}
    counts = dict.fromkeys(sums, 0)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x
            x = x if float16 else x.float()
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise RuleError(f"preprocess_corda: the input of {name!r} holds NaN or Inf; check the data.")
            sums[name] = sums[name] + x.t() @ x
            counts[name] += 1
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in targets]
    was_training = model.training
    model.eval()
    try:
        if callable(data):
            data()
        else:
            for batch in data:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise RuleError(f"preprocess_corda: the data never reached {missing[:3]}; run the model on data that "
                        "calls every target.")
    return {name: sums[name] / counts[name] for name in sums}


@torch.no_grad()
def _eigens(module: nn.Module, covariance: torch.Tensor, r: int, method: str) -> CordaEigens:
    w = module.weight.detach().float()
    w = w.T if type(module).__name__ == "Conv1D" else w
    c = covariance.float()
    eye = torch.eye(c.shape[0], device=c.device)
    damp = 0.01
    while True:
        fixed = c + eye * torch.mean(torch.diag(c)) * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inverse).t()
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(s[keep].clone(), u[:, keep].clone(), v[:, keep].clone())
