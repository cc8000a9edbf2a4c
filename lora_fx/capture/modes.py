"""Find ``self.training``-dependent control flow that a capture freezes, and warn about it.

Both capture paths run the model's Python once, so ``if self.training: ...`` takes the branch of the mode the
model was in; afterwards ``lm.train()`` / ``lm.eval()`` switch LoRA's dropout and the base's dropout modules
(traced graphs) but not such a branch. The check captures or runs the model in the other mode and compares:

- traced (no example inputs): trace again with every module's ``training`` flipped and compare the code of the
  outer graph and of each block template;
- exported: run the model eagerly on the example inputs in both modes with its dropout modules off (an exported
  base keeps the dropout of its capture mode; ``warn_training_mode`` covers it), and compare the outputs.

Example::

    with flipped_mode(model):
        ...  # every module's training flag inverted, put back on exit
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

_DROPOUT = nn.modules.dropout._DropoutNd


@contextlib.contextmanager
def modes(model: nn.Module, train: bool, no_dropout: bool = False) -> Iterator[None]:
    """Every module in mode ``train``; with ``no_dropout`` every dropout module in eval with p = 0 (functional
    dropout that reads a module's p, as GPT-2's attention does, too). Flags and p are restored on exit."""
    saved = [(m, m.training) for m in model.modules()]
    probs = [(m, m.p) for m in model.modules() if isinstance(m, _DROPOUT)] if no_dropout else []
    try:
        for m in model.modules():
            m.training = train and not (no_dropout and isinstance(m, _DROPOUT))
        for m, _ in probs:
            m.p = 0.0
        yield
    finally:
        for m, flag in saved:
            m.training = flag
        for m, p in probs:
            m.p = p


def _warn(model: nn.Module, where: str) -> None:
    mode = "training" if model.training else "eval"
    other = "eval" if model.training else "train"
    warnings.warn(
        f"{type(model).__name__} has self.training-dependent control flow{where}: it was captured in {mode} mode, "
        f"and lm.{other}() will not switch it (only LoRA's and the base's dropout follow the mode). Put the model in "
        "the mode you will run (model.train() / model.eval()) before lorafy, and lorafy again to change it.",
        stacklevel=4)


def check_traced(model: nn.Module, code: str, template_codes: dict[str, str], trace) -> None:
    """Warn when tracing in the other mode gives other code; ``trace()`` returns (outer code, template codes)."""
    try:
        with modes(model, not model.training):
            other, other_templates = trace()
    except Exception:  # the other mode does not trace: nothing to compare
        return
    differ = sorted(t for t, c in template_codes.items() if other_templates.get(t) not in (None, c))
    if differ or other != code:
        _warn(model, f" (in {', '.join(differ)})" if differ else "")


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal, or within float rounding for floating outputs (eval may take fused kernels, as MHA's fast path)."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    return torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6, equal_nan=True)


def check_exported(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Warn when the model's outputs on the example inputs differ between train and eval (dropout aside)."""
    outs = []
    try:
        for train in (model.training, not model.training):
            with modes(model, train, no_dropout=True), torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outs.append(pytree.tree_leaves(model(*args, **kwargs)))
    except Exception:  # an eager run the export path does not need: no verdict
        return
    a, b = outs
    same = len(a) == len(b) and all(
        not isinstance(x, torch.Tensor) or (isinstance(y, torch.Tensor) and x.shape == y.shape
                                            and _close(x, y)) for x, y in zip(a, b))
    if not same:
        _warn(model, "")
