"""``lorafy``: capture a model, match rules, and insert LoRA branches as graph rewrites.

Example::

    import lora_fx
    lm = lora_fx.lorafy(model, lora_fx.Rule(["q_proj", "v_proj"], r=8, alpha=16),
                        example_inputs=(input_ids,))
    print(lm.report())
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

from torch import nn

from .adapters.store import check_adapter_name
from .capture import capture
from .model import LoraModel
from .peft.compat import peft_compatible
from .rules import RuleLike, as_ruleset


def lorafy(
    model: nn.Module,
    rules: RuleLike,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    fuse: bool = True,
    fused_loss: bool = False,
) -> LoraModel:
    """Add LoRA to ``model``'s layers that ``rules`` select: ``y = W x + s · B A dropout(x)``.

    ``rules``: a Rule, a string, a sequence of them, or a ``peft.LoraConfig``. With ``example_inputs`` /
    ``example_kwargs`` the model is captured with ``torch.export`` (needed for Hugging Face models),
    otherwise with ``torch.fx.symbolic_trace``. The graph shares the model's parameters; base parameters
    are frozen (``requires_grad=False``), as PEFT does. fp16/bf16 base weights get float32 adapters unless
    ``autocast_adapter_dtype=False``. ``fuse=False`` keeps every LoRA branch as plain ``F.linear`` / ``*`` /
    ``+`` nodes (same math as PEFT, op for op) instead of the fused sibling ops. ``fused_loss=True``: where the
    model computes its language-model loss (called with ``labels``), compute it from the hidden states a chunk of
    tokens at a time (``ops.fused_loss``): the ``[tokens, vocab]`` logits are never materialised, and the output's
    ``logits`` is None in those calls.
    """
    ruleset = as_ruleset(rules)
    check_adapter_name(adapter_name)
    lm = _model_class()(capture(model, example_inputs, example_kwargs), fuse=fuse, fused_loss=fused_loss)
    with _discard_on_error(lm):
        lm.add_adapter(adapter_name, ruleset, autocast_adapter_dtype=autocast_adapter_dtype)
    return lm


def from_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    adapter_name: str = "default",
    allow_pickle: bool = False,
    strict_finite: bool = False,
    fused_loss: bool = False,
) -> LoraModel:
    """Capture ``model`` and load the PEFT adapter directory ``path`` into it (config and weights). NaN or Inf
    in the adapter's tensors: a warning naming them, an error with ``strict_finite=True``.

    Example::

        lm = lora_fx.from_peft(AutoModelForCausalLM.from_pretrained(base), "my-adapter",
                               example_inputs=(input_ids,))
    """
    check_adapter_name(adapter_name)
    lm = _model_class()(capture(model, example_inputs, example_kwargs), fused_loss=fused_loss)
    with _discard_on_error(lm):
        lm.load_adapter(path, adapter_name, allow_pickle=allow_pickle, strict_finite=strict_finite)
    return lm


@functools.cache
def _model_class() -> type[LoraModel]:
    """LoraModel, also a peft.PeftModel when PEFT is installed (see ``peft_compat``)."""
    return peft_compatible(LoraModel)


@contextlib.contextmanager
def _discard_on_error(lm: LoraModel):
    """A failed call leaves nothing behind: no adapter store on a GraphModule passed in, the base parameters'
    ``requires_grad`` as they were."""
    try:
        yield
    except BaseException:
        lm.discard()
        raise
    lm.release_snapshot()  # the snapshot held every base parameter; once lorafy succeeded it is not needed
