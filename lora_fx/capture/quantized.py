"""Quantized bases (QLoRA): bitsandbytes ``Linear4bit`` (nf4/fp4, double quantization) and ``Linear8bitLt``.

bitsandbytes keeps its weights in tensor subclasses that graph capture cannot fake, so before capture each such
layer is replaced in the model by a plain module that holds the same packed storage as buffers and calls one op::

    4-bit:  y = linear_4bit(x, packed, absmax, ...) = F.linear(x, dequantize_4bit(W_q), b)
    8-bit:  y = linear_8bit(x, CB, SCB, b)          = F.linear(x, CB · SCB / 127, b)

Each op is a ``torch.library`` custom op (one graph node, a fake for export, a backward that dequantizes again
instead of saving the full-precision weight), so the base weight exists in full precision only for the span of
one layer's matmul, as in bitsandbytes' own training path. The recogniser ``quantized_linear`` makes the node a
linear target; LoRA runs in the compute dtype beside it, as PEFT's does. The replacement keeps the layer's
bias Parameter and the compute-dtype casts of ``Linear4bit.forward``.

Example::

    swap_quantized(model)      # done by capture: model.layers.0.self_attn.q_proj is now a QuantLinear
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import CaptureError
from ..ops.quantized import QuantLinear

__all__ = ["swap_quantized"]


def swap_quantized(model: nn.Module) -> int:
    """Replace every bitsandbytes Linear4bit / Linear8bitLt in ``model`` by a ``QuantLinear`` over the same
    storage (in place; returns how many). Refuses torchao-quantized weights and GPTQ layers by name."""
    _refuse_torchao(model)
    _refuse_gptq(model)
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # a model cannot hold bitsandbytes layers unless bitsandbytes was imported
        return 0
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, kinds)]
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    compute = max(set(floats), key=floats.count) if floats else torch.float32  # 8-bit layers: the model's dtype
    replaced = [(parent, name, QuantLinear(child, compute)) for parent, name, child in swaps]
    for parent, name, module in replaced:
        setattr(parent, name, module)
    return len(replaced)


def _refuse_torchao(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if type(p).__module__.startswith("torchao") or type(p.data).__module__.startswith("torchao"):
            raise CaptureError(
                f"{name} is a torchao quantized tensor ({type(p.data).__name__}); lora_fx captures bitsandbytes "
                "4-bit/8-bit bases (BitsAndBytesConfig), not torchao's tensor subclasses. Quantize with "
                "bitsandbytes, or lorafy the full-precision model and quantize after merging.")


_GPTQ_PACKAGES = ("gptqmodel", "auto_gptq", "optimum")


def _refuse_gptq(model: nn.Module) -> None:
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.split(".")[0] in _GPTQ_PACKAGES and "QuantLinear" in cls.__name__:
            raise CaptureError(
                f"{name} is a GPTQ layer ({cls.__module__}.{cls.__name__}); lora_fx captures bitsandbytes 4-bit/8-bit "
                "bases, not GPTQ kernels. Load the full-precision model (a QA-LoRA adapter trained on the GPTQ one "
                "loads onto it and merges), or quantize with bitsandbytes.")
