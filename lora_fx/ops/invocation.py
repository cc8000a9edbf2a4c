"""Activated LoRA's token mask: in each row, the positions from the start of the last occurrence of the invocation
token sequence on (PEFT's ``alora_offsets``), as tensor ops a graph can hold::

    match[b, j] = all_k ids[b, j + k] == tokens[k]        start[b] = the last j with match (or none)
    mask[b, t]  = start[b] exists and t >= start[b]

Example::

    invocation_mask(torch.tensor([[5, 1, 2, 7]]), (1, 2))     # [[False, True, True, True]]
"""

from __future__ import annotations

import torch


def invocation_mask(ids: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """``[batch, length]`` bool: where an aLoRA adapter with invocation ``tokens`` is active (see the module)."""
    n = len(tokens)
    length = ids.shape[-1]
    if length < n:
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    seq = torch.tensor(tokens, dtype=ids.dtype, device=ids.device)
    match = (ids.unfold(-1, n, 1) == seq).all(-1)  # [batch, length - n + 1]
    index = torch.arange(match.shape[-1], device=ids.device)
    start = torch.where(match, index, torch.full_like(index, -1)).amax(-1, keepdim=True)
    positions = torch.arange(length, device=ids.device)
    return (positions >= start) & (start >= 0)


def masked_rows(delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``delta`` where ``mask`` is True, 0 elsewhere (``mask`` None: nowhere, as PEFT without offsets)."""
    if mask is None:
        return delta * 0
    return delta * mask.reshape(*delta.shape[:-1], 1).to(delta.dtype)
