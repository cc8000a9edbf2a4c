"""PEFT's DoRA forwards, one per kind: the functions DoRA graph nodes call.

With ``m`` the magnitude vector and ``n = ‖W + s·ΔW‖`` per output (detached, as PEFT does), ``k = m / n``::

    y' = y + (k - 1) · (W x) + k · s · B A x

Example::

    y2 = dora_linear(x, y, W, b, A, B, m, 2.0, False)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dora_linear(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                in_out: bool, dropout: torch.nn.Module | None = None) -> torch.Tensor:
    """PEFT's DoRA for a linear layer::

        n = ‖W + s·B A‖ per row (detached);  k = m / n
        y' = y + (k - 1) · (W x) + k · s · B A x

    ``W x`` is ``y - bias``; in training with dropout, x is dropped out and ``W x`` recomputed, as PEFT does.
    """
    w = weight.t() if in_out else weight
    lora_weight = lora_b @ lora_a
    norm = torch.linalg.norm(w + scaling * lora_weight.detach(), dim=1).to(w.dtype).detach()
    k = (magnitude / norm).view(1, -1)
    recompute = dropout is not None and dropout.training
    if recompute:
        x = dropout(x)
    lora_result = F.linear(F.linear(x, lora_a), lora_b)
    if recompute:
        base = F.linear(x, w)
    else:
        base = y - bias if bias is not None else y
    return y + ((k - 1) * base + k * lora_result * scaling)


def dora_embedding(idx: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                   padding_idx: int | None) -> torch.Tensor:
    """PEFT's DoRA for an embedding: ``k = m / ‖Wᵀ + s·B A‖``; ``y' = k · y + k · s · emb(idx, Aᵀ) Bᵀ``."""
    lora_weight = lora_b @ lora_a
    norm = torch.linalg.norm(weight.t() + scaling * lora_weight.detach(), dim=1).to(weight.dtype).detach()
    k = magnitude / norm
    return k * y + k * (F.embedding(idx, lora_a.t(), padding_idx=padding_idx) @ lora_b.t()) * scaling


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dora_conv(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
              stride, padding, dilation, dropout: torch.nn.Module | None = None, groups: int = 1) -> torch.Tensor:
    """PEFT's DoRA for a convolution (``x`` already padded for non-zero padding modes)::

        n = ‖W + s·ΔW‖ per output channel (detached);  k = m / n
        y' = y + (k - 1) · conv(x, W) + k · s · conv_B(conv_A(x))
    """
    conv = _CONV_FNS[weight.dim() - 2]
    r = lora_a.shape[0]
    lora_weight = (lora_b.reshape(-1, r) @ lora_a.reshape(r, -1)).reshape(weight.shape)
    w = weight + scaling * lora_weight.detach()
    norm = w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0).detach()
    k = magnitude / norm
    recompute = dropout is not None and dropout.training
    if recompute:
        x = dropout(x)
    lora_result = conv(conv(x, lora_a, None, stride, padding, dilation), lora_b, None, 1, 0, 1, groups)
    if recompute:
        base = conv(x, weight, None, stride, padding, dilation, groups)
    else:
        base = y - bias.view(1, -1, *([1] * (y.dim() - 2))) if bias is not None else y
    return y + ((k - 1) * base + k * lora_result * scaling)
