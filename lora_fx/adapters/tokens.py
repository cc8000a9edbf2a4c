"""PEFT's trainable tokens (``trainable_token_indices``): only the listed rows of an embedding train.

Each adapter keeps, per embedding (or output layer) path, the row indices, a trainable ``delta`` holding the rows'
new values (initialised to the current ones, so outputs do not change) and the ``original`` rows. The graphs read
``W.index_copy(0, indices, delta)`` wherever they read W (``passes.tokens``), so a tied output layer follows the
embedding; the checkpoint holds ``<path>.token_adapter.trainable_tokens_delta`` as PEFT writes it::

    W' = W with rows indices replaced by delta

Example::

    TokenDelta(model.embed_tokens.weight, [3, 5, 7]).delta.shape   # (3, hidden)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .names import child_name

PEFT_SUFFIX = "token_adapter.trainable_tokens_delta"


class TokenDelta(nn.Module):
    def __init__(self, weight: torch.Tensor, indices: Sequence[int]) -> None:
        super().__init__()
        rows = weight.shape[0]
        bad = [i for i in indices if not 0 <= int(i) < rows]
        if bad or len(set(indices)) != len(indices) or not indices:
            raise ValueError(f"token indices {list(indices)} must be distinct rows in [0, {rows}) "
                             f"({'out of range: ' + str(bad) if bad else 'empty or repeated'})")
        idx = torch.tensor([int(i) for i in indices], dtype=torch.long, device=weight.device)
        self.register_buffer("indices", idx)
        self.register_buffer("original", weight.detach()[idx].clone())
        self.delta = nn.Parameter(weight.detach()[idx].clone())

    def extra_repr(self) -> str:
        return f"tokens={self.indices.tolist()}"


class Tokens(nn.Module):
    """An adapter's TokenDelta per module path (children named after the paths)."""

    def __init__(self, deltas: Mapping[str, TokenDelta]) -> None:
        super().__init__()

        self.paths: dict[str, str] = {}
        taken: set[str] = set()
        for path, delta in deltas.items():
            self.paths[path] = child_name(path, taken, type(self))
            self.add_module(self.paths[path], delta)
