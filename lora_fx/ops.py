"""The LoRA math on weights: ΔW of a unit in its base weight's layout, computed in float32.

- linear ``[out, in]``: ``ΔW = s · B @ A`` (``[in, out]`` layout, GPT-2's Conv1D: its transpose);
- embedding ``[num, dim]``: ``ΔW = s · (B @ A)ᵀ``;
- conv ``[out, in, *k]``: ``ΔW = s · (B[:, :, 1..] @ A.flatten(1)).view(out, in, *k)`` (a 1x1 conv after a conv
  is one conv).

Example::

    w_merged = (w.float() + delta_weight(unit, "out_in", w.shape)).to(w.dtype)
"""

from __future__ import annotations

import torch

from .store import LoraUnit


def delta_weight(
    unit: LoraUnit, layout: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``s · ΔW`` for ``unit`` in ``dtype`` (float32 by default), shaped like the base weight (``shape``)."""
    a, b = unit.lora_A.detach().to(dtype), unit.lora_B.detach().to(dtype)
    if unit.kind == "conv":
        delta = (b.flatten(1) @ a.flatten(1)).view(tuple(shape))
    else:
        delta = b @ a
        if unit.kind == "embedding" or layout == "in_out":
            delta = delta.T
    return delta * unit.scaling


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32, or the weight's own dtype when it is wider (float64)."""
    return torch.promote_types(weight_dtype, torch.float32)
