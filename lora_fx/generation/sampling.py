"""Choosing the next token from logits: greedy, or sampling after Hugging Face's warpers, in their order
(temperature, then top-k, then top-p).

- temperature ``t``: ``logits / t``;
- top-k ``k``: every logit below the k-th largest becomes ``-inf``;
- top-p ``p``: sorted ascending, the tokens whose cumulative probability stays at or below ``1 - p`` are
  removed (the most likely token is always kept).

Example::

    next_ids = next_tokens(logits, SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise AdapterError(f"temperature must be a positive number, got {self.temperature!r}.")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k > 0):
            raise AdapterError(f"top_k must be a positive integer or None, got {self.top_k!r}.")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise AdapterError(f"top_p must be in (0, 1] or None, got {self.top_p!r}.")


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` token ids."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k is not None:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - cfg.top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
