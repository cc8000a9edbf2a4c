"""Weighted combinations of adapters (PEFT's ``add_weighted_adapter`` types), per target key.

With ``Δᵢ = sᵢ Bᵢ Aᵢ`` (each adapter's own scaling, rsLoRA included) and weights ``wᵢ``, the new adapter has
scaling 1 (``alpha = r``) and:

- ``linear`` / ``cat``: exactly ``Σ wᵢ Δᵢ``: ``A = [w₁s₁A₁; w₂s₂A₂; ...]``, ``B = [B₁ B₂ ...]`` (rank ``Σ rᵢ``).
  PEFT's ``linear`` instead sums the A's and the B's separately, which adds cross terms ``Bᵢ Aⱼ``.
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the task vectors
  ``Δᵢ`` combined by task arithmetic / TIES / DARE / magnitude pruning, then ``Δ ≈ U_k S_k V_kᵀ`` truncated to
  ``svd_rank`` (default: the largest rank): ``B = U_k S_k``, ``A = V_kᵀ``; the relative reconstruction error
  ``‖Δ - B A‖ / ‖Δ‖`` is reported per key.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's definition, on the factors (the A's with
  weights ``sign·√|wᵢsᵢ|``, the B's with ``√|wᵢsᵢ|``; equal ranks needed), so cross terms remain, as in PEFT.

Example::

    a, b, err = combine([(1.0, unit_a), (0.5, unit_b)], "svd", svd_rank=8)
"""

from __future__ import annotations

import math

import torch

from ..errors import AdapterError

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_TYPES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
TYPES = ("linear", "cat", *SVD_TYPES, *FACTOR_TYPES)


def prune(t: torch.Tensor, density: float, method: str) -> torch.Tensor:
    """Keep the ``density`` fraction of entries: the largest magnitudes, or a random draw rescaled by 1/density."""
    if density >= 1:
        return t
    if method == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
        return t * mask.view(t.shape)
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def merge_tasks(tensors: list[torch.Tensor], weights: list[float], method: str, density: float | None,
                majority_sign_method: str = "total") -> torch.Tensor:
    """Task arithmetic (``Σ wᵢ tᵢ``), magnitude pruning, TIES (prune, elect the sign, mean of the agreeing
    entries) or DARE (random prune, rescale; then linear or TIES) over same-shaped task tensors."""
    method = method.removesuffix("_svd")
    if method in ("svd", "linear"):
        pruned = tensors
    else:
        how = "random" if method.startswith("dare") else "magnitude"
        pruned = [prune(t, density, how) for t in tensors]
    stacked = torch.stack(pruned)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if method not in ("ties", "dare_ties"):
        return (stacked * w).sum(0)
    sign = stacked.sign()
    magnitude = stacked.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(parts: list[tuple[float, object]], combination_type: str, svd_rank: int | None = None,
            density: float | None = None, majority_sign_method: str = "total"
            ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(A, B, relative SVD error or None) of the combination of ``parts`` = ``[(weight, unit), ...]`` (one key)."""
    units = [u for _, u in parts]
    if combination_type in ("linear", "cat"):
        a = torch.cat([w * u.scaling * u.lora_A.detach()[:u.r].float() for w, u in parts])
        b = torch.cat([u.lora_B.detach()[:, :u.r].float() for u in units], dim=1)
        return a, b, None
    if combination_type in SVD_TYPES:
        return _svd(parts, combination_type, svd_rank, density, majority_sign_method)
    ranks = {u.r for u in units}
    if len(ranks) > 1:
        raise AdapterError(f"combination_type={combination_type!r} combines A's and B's entry by entry and needs "
                           f"equal ranks; {units[0].key!r} has ranks {sorted(ranks)}. Use {combination_type}_svd "
                           "or 'cat'.")
    scaled = [w * u.scaling for w, u in parts]
    wa = [math.copysign(math.sqrt(abs(x)), x) for x in scaled]
    wb = [math.sqrt(abs(x)) for x in scaled]
    a = merge_tasks([u.lora_A.detach()[:u.r].float() for u in units], wa, combination_type, density,
                    majority_sign_method)
    b = merge_tasks([u.lora_B.detach()[:, :u.r].float() for u in units], wb, combination_type, density,
                    majority_sign_method)
    return a, b, None


def _svd(parts, combination_type, svd_rank, density, majority_sign_method):
    unit = parts[0][1]
    deltas = [u.strategy.oriented(u.delta_weight(torch.float32), u.geometry).flatten(1) for _, u in parts]
    delta = merge_tasks(deltas, [w for w, _ in parts], combination_type, density, majority_sign_method)
    rank = min(svd_rank or max(u.r for _, u in parts), *delta.shape)
    u_, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b = u_[:, :rank] * s[:rank]
    a = vh[:rank]
    err = float((delta - b @ a).norm() / delta.norm()) if delta.norm() > 0 else 0.0
    shape_a, shape_b = unit.strategy.shapes(unit.geometry, rank)
    return a.reshape(shape_a), b.reshape(shape_b), err


def check_args(adapters: list[str], weights: list[float], combination_type: str, density: float | None,
               majority_sign_method: str, svd_rank: int | None) -> None:
    if combination_type not in TYPES:
        raise AdapterError(f"combination_type={combination_type!r}: use one of {TYPES}.")
    if not adapters or len(adapters) != len(weights):
        raise AdapterError(f"add_weighted_adapter needs one weight per adapter; got {len(adapters)} adapters and "
                           f"{len(weights)} weights.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be finite numbers; got {weights}.")
    pruning = combination_type not in ("linear", "cat", "svd")
    if pruning and (density is None or not 0 <= density <= 1):
        raise AdapterError(f"combination_type={combination_type!r} prunes: pass density in [0, 1] (the fraction "
                           f"of entries kept); got {density!r}.")
    if combination_type.startswith("dare") and density == 0:
        raise AdapterError("DARE rescales by 1/density: pass density > 0.")
    if majority_sign_method not in ("total", "frequency"):
        raise AdapterError(f"majority_sign_method={majority_sign_method!r}: use 'total' or 'frequency'.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise AdapterError(f"svd_rank={svd_rank!r}: pass a positive integer, or None for the largest rank.")
