"""Train and eval mode in captured graphs.

Both capture paths run the model's Python once, so ``if self.training: ...`` takes the branch of the mode the
model was in, and an exported graph keeps its dropout and BatchNorm behaviour of that mode.

- exported: ``mode_dependent`` tells whether the model behaves differently in the other mode (dropout, batch
  statistics, a ``self.training`` branch); if so, the LoraModel captures the other mode lazily when
  ``lm.train()`` / ``lm.eval()`` first asks for it (``model.calls``), so both modes run as the eager model does;
- traced (no example inputs): the graph's modules follow ``train()`` / ``eval()``, but a ``self.training`` branch
  does not; ``check_traced`` traces again in the other mode and warns when the code differs.

Example::

    with modes(model, train=False):
        ...  # every module in eval mode, flags put back on exit
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


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


def mode_dependent(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether an exported capture of ``model`` depends on its mode: it has dropout (p > 0), or its outputs on
    the example inputs differ between train and eval with dropout off (BatchNorm's batch statistics, a
    ``self.training`` branch, a functional dropout). An eager run that fails counts as dependent."""
    if any(isinstance(m, _DROPOUT) and m.p > 0 for m in model.modules()):
        return True
    outs, saved = [], [(b, b.clone()) for b in model.buffers()]  # a training forward updates running stats
    try:
        for train in (model.training, not model.training):
            with modes(model, train, no_dropout=True), torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outs.append(pytree.tree_leaves(model(*args, **kwargs)))
    except Exception:
        return True
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    a, b = outs
    return not (len(a) == len(b) and all(
        not isinstance(x, torch.Tensor) or (isinstance(y, torch.Tensor) and x.shape == y.shape
                                            and _close(x, y)) for x, y in zip(a, b)))
