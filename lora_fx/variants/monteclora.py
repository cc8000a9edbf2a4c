"""MonteCLoRA (PEFT's ``monteclora_config``): in training, A is a learned mixture of n noisy copies of itself; in
eval it is plain LoRA (the mixture's mean). Per training forward, from a buffer of pre-drawn normals::

    Σ = diag(clip(diag(D Z_w D), 1e-3)),  D = diag(exp(σ)),  Z_w ~ Wishart(r, I)     (σ: ``std_prior``, learned)
    ε_k = c · Z_k chol(Σ)  (k = 1..n, Z_k ~ N(0, I) [in, r]),   w = softmax(L z + μ)  (Dirichlet logits, learned)
    A' = (Σ_k w_k (Aᵀ + ε_k))ᵀ,     y' = y + s · B A' dropout(x)

The regularizer (``lm.variant_loss()``; PEFT's ``_get_monteclora_loss()``: averaged over the layers) is
``kl_loss_weight · (KL_dirichlet + KL_wishart + KL_gaussian) (+ ‖w‖² with use_entropy)``, from the last forward.
The sampler (PEFT's ``lora_monteclora_sampler``: ``std_prior``, ``expert_weights_prior`` trained; ``gaussian_var_prior``
and ``expert_weights`` kept from the last forward) draws in PEFT's order, so a seed gives PEFT's numbers. Linear
``[out, in]`` weights; merges as plain LoRA; not routable, fusable or combinable.

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, monteclora=True), example_inputs=(ids,))
    loss = out.loss + lm.variant_loss()
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RuleError
from .base import Variant

FIELDS = ("num_samples", "use_entropy", "dirichlet_prior", "sample_scaler", "kl_loss_weight", "buffer_size")


def wishart_identity(p: int, dtype: torch.dtype) -> torch.Tensor:
    """One draw of Wishart(df=p, I_p) by Bartlett's decomposition, with torch's ``Wishart`` draws in its order."""
    df = torch.tensor(float(p), dtype=dtype)
    chi2 = torch.distributions.Chi2(df.unsqueeze(-1) - torch.arange(p, dtype=dtype))
    noise = chi2.rsample().sqrt().clamp(min=torch.finfo(dtype).eps).diag_embed(dim1=-2, dim2=-1)
    i, j = torch.tril_indices(p, p, offset=-1)
    noise[..., i, j] = torch.randn(p * (p - 1) // 2, dtype=dtype)
    chol = torch.eye(p, dtype=dtype) @ noise
    return chol @ chol.transpose(-2, -1)


class Sampler(nn.Module):
    """PEFT's ``MontecloraSampler``: the variational parameters and a buffer of pre-drawn noise."""

    def __init__(self, in_features: int, r: int, config: tuple, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.r = in_features, r
        (self.num_samples, self.use_entropy, self.dirichlet_prior, self.sample_scaler, self.kl_loss_weight,
         self.buffer_size) = config
        self.std_prior = nn.Parameter(torch.rand(r, dtype=dtype).to(device))
        self.expert_weights_prior = nn.Parameter(torch.rand(self.num_samples, dtype=dtype).to(device))
        self.register_buffer("gaussian_var_prior", torch.eye(r, dtype=dtype, device=device))
        self.register_buffer("expert_weights", torch.ones(self.num_samples, dtype=dtype, device=device)
                             / self.num_samples)
        self._noise: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._next = 0
        self._refill()

    @torch.no_grad()
    def _refill(self) -> None:
        dtype, device, n = self.std_prior.dtype, self.std_prior.device, self.num_samples
        z_mvn = torch.randn((self.buffer_size, n, self.in_features, self.r), dtype=dtype).to(device)
        z_dirichlet = torch.randn((self.buffer_size, n), dtype=dtype).to(device)
        self._noise = [(z_mvn[i], wishart_identity(self.r, torch.float32).to(device, dtype), z_dirichlet[i])
                       for i in range(self.buffer_size)]
        self._next = 0

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise [n, in, r], mixture weights [n]) for one training forward."""
        if self._next >= self.buffer_size:
            self._refill()
        z_mvn, z_wishart, z_dirichlet = self._noise[self._next]
        self._next += 1
        std = torch.diag(torch.exp(self.std_prior))
        var = torch.diag(torch.clip((std @ z_wishart @ std.T).diag(), min=1e-3))
        self.gaussian_var_prior = var
        chol = torch.linalg.cholesky(var.float()).to(var.dtype)
        noise = self.sample_scaler * torch.nan_to_num(torch.einsum("eio,op->eip", z_mvn, chol), nan=1e-3)
        self.expert_weights = torch.softmax(self._dirichlet_logits(torch.exp(self.expert_weights_prior), z_dirichlet),
                                            dim=-1)
        return noise, self.expert_weights

    def _dirichlet_logits(self, alpha: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        eps, n = 1e-6, self.num_samples
        alpha = torch.clamp(alpha, min=eps)
        mu = torch.log(alpha) - torch.log(alpha).mean()
        diag = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / n ** 2 * (1 / alpha).sum(), min=eps)
        sigma = torch.diag(diag) + eps * torch.eye(n, device=alpha.device)
        try:
            chol = torch.linalg.cholesky(sigma.float())
        except torch.linalg.LinAlgError:
            chol = torch.linalg.cholesky((sigma + 1e-4 * torch.eye(n, device=alpha.device)).float())
        return chol.to(sigma.dtype) @ z + mu

    def variational_loss(self) -> torch.Tensor | float:
        if not self.training:
            return 0.0
        n, r = self.num_samples, self.r
        alpha = torch.exp(self.expert_weights_prior)
        prior = torch.full((n,), float(self.dirichlet_prior), device=alpha.device)
        gamma = torch.lgamma
        kl_dirichlet = ((gamma(alpha.sum()) - gamma(prior.sum())) + (gamma(alpha) - gamma(prior)).sum()
                        + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum())
        std = torch.diag(torch.exp(self.std_prior))
        var = torch.diag((std @ std.T).diag())
        kl_wishart = 0.5 * (-torch.log(var).trace() * r + var.trace() * r - r ** 2)
        gauss = torch.clamp(self.gaussian_var_prior, min=1e-6)
        kl_gaussian = n * 0.5 * (gauss.trace() - torch.log(gauss).trace() - r)
        entropy = (self.expert_weights ** 2).sum() if self.use_entropy else 0
        return self.kl_loss_weight * (kl_dirichlet + kl_wishart + kl_gaussian) + entropy


class MonteCloraInput(nn.Module):
    """A MonteCLoRA unit's input side: its dropout, then ``A' x`` in training (``A x`` in eval). Holds the sampler."""

    def __init__(self, dropout: nn.Module, sampler: Sampler) -> None:
        super().__init__()
        self.drop, self.sampler = dropout, sampler
        self.p = float(getattr(dropout, "p", 0.0))

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, a)
        x = self.drop(x)  # before the sampler, as PEFT (a buffer refill draws after the dropout mask)
        noise, weights = self.sampler()
        if torch.isnan(noise).any() or torch.isnan(weights).any():
            warnings.warn("MonteCLoRA sampling produced NaNs; this step uses A as it is.", stacklevel=2)
            return F.linear(x, a)
        mixed = torch.einsum("n,nij->ij", weights, a.T + torch.nan_to_num(noise, nan=0.0))
        return F.linear(x, mixed.T)


class Monteclora(Variant):
    name = "monteclora"
    label = "MonteCLoRA"
    field = "monteclora_config"
    routable = fusable = combinable = False
    loss_reduction = "mean"

    def __init__(self, *config) -> None:
        self.config = tuple(config)

    def params(self) -> tuple:
        return self.config

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.transposed or geometry.left or geometry.quant:
            raise RuleError(f"MonteCLoRA on {key!r}: PEFT defines it for nn.Linear weights [out, in] (this is a "
                            f"{kind.name}{' with a quantized base' if geometry.quant else ''}); use plain LoRA here.")

    @torch.no_grad()
    def init(self, unit, weight):
        a = unit.lora_A
        unit.dropout = MonteCloraInput(unit.dropout, Sampler(unit.geometry.in_features, unit.r, self.config, a.dtype,
                                                             a.device))

    def peft_shapes(self, kind, geometry, r):
        n = self.config[0]
        return {**super().peft_shapes(kind, geometry, r), **{f"lora_monteclora_sampler.{k}": s for k, s in (
            ("std_prior", (r,)), ("expert_weights_prior", (n,)), ("gaussian_var_prior", (r, r)),
            ("expert_weights", (n,)))}}

    def peft_tensors(self, unit):
        sampler = unit.dropout.sampler
        return {**super().peft_tensors(unit), **{f"lora_monteclora_sampler.{k}": getattr(sampler, k) for k in (
            "std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")}}

    def peft_config_fields(self):
        return {"monteclora_config": dict(zip(FIELDS, self.config))}

    def regularization(self, unit):
        return unit.dropout.sampler.variational_loss()

    def emit(self, bb):
        return self.emit_through_input(bb, "lora_monteclora")
