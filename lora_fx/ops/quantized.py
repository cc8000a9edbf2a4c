"""bitsandbytes' 4-bit and 8-bit linear layers as ``torch.library`` custom ops (one graph node each, a fake for
export, a backward that dequantizes again instead of saving the full-precision weight), and ``QuantLinear``, the
plain module that holds a bitsandbytes layer's packed storage as buffers and calls them::

    4-bit:  y = linear_4bit(x, packed, absmax, ...) = F.linear(x, dequantize_4bit(W_q), b)
    8-bit:  y = linear_8bit(x, CB, SCB, b)          = F.linear(x, CB · SCB / 127, b)

Example::

    y = torch.ops.lora_fx.linear_8bit(x, cb, scb, bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CaptureError


def _dequant_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                  shape, dtype):
    ops = torch.ops.bitsandbytes
    if nested_absmax is not None:  # double quantization: the absmax values are themselves 8-bit blockwise
        absmax = ops.dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize, torch.float32) + offset
    return ops.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)


@torch.library.custom_op("lora_fx::linear_4bit", mutates_args=())
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                nested_code: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, nested_blocksize: int,
                quant_type: str, shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    w = _dequant_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                      shape, x.dtype)
    return F.linear(x, w, bias)


@linear_4bit.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_4bit(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, *meta, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)  # packed: no full-precision W kept
    ctx.meta, ctx.has_bias = meta, bias is not None


def _backward_4bit(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = grad @ _dequant_4bit(packed, absmax, nested_absmax, nested_code, offset, *ctx.meta, grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, None, None, None, None, None, None, gb


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


def _dequant_8bit(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return cb.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0).to(dtype))  # bitsandbytes' MatMul8bitFp


@torch.library.custom_op("lora_fx::linear_8bit", mutates_args=())
def linear_8bit(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, _dequant_8bit(cb, scb, x.dtype), bias)


@linear_8bit.register_fake
def _(x, cb, scb, bias):
    return x.new_empty((*x.shape[:-1], cb.shape[0]))


def _setup_8bit(ctx, inputs, output):
    x, cb, scb, bias = inputs
    ctx.save_for_backward(cb, scb)
    ctx.has_bias = bias is not None


def _backward_8bit(ctx, grad):
    cb, scb = ctx.saved_tensors
    gx = grad @ _dequant_8bit(cb, scb, grad.dtype) if ctx.needs_input_grad[0] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, None, None, gb


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)

OPS = {torch.ops.lora_fx.linear_4bit.default: "4bit", torch.ops.lora_fx.linear_4bit: "4bit",
       torch.ops.lora_fx.linear_8bit.default: "int8", torch.ops.lora_fx.linear_8bit: "int8"}


class QuantLinear(nn.Module):
    """A bitsandbytes layer's packed weight as buffers, computed by ``linear_4bit`` / ``linear_8bit``.
    ``quant``: "nf4", "fp4" or "int8"; ``compute_dtype``: the dtype x is cast to (the output is cast back; an
    8-bit layer has none of its own and takes the model's)."""

    def __init__(self, layer: nn.Module, compute: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = layer.bias
        weight = layer.weight
        state = getattr(weight, "quant_state", None)
        if state is not None:
            if getattr(state, "packing_format_for_cpu", False):
                raise CaptureError(
                    f"{type(layer).__name__} weights were repacked for CPU inference by an earlier eval forward, "
                    "which lora_fx cannot read; load the model again and lorafy it before running it.")
            self.quant, self.compute_dtype = state.quant_type, layer.compute_dtype or state.dtype
            self.blocksize, self.shape = state.blocksize, list(state.shape)
            self.register_buffer("packed", weight.data.view(torch.uint8))
            self.register_buffer("absmax", state.absmax)
            nested = state.nested
            self.nested_blocksize = state.state2.blocksize if nested else 0
            self.register_buffer("nested_absmax", state.state2.absmax if nested else None)
            self.register_buffer("nested_code", state.state2.code if nested else None)
            self.register_buffer("offset", state.offset.reshape(()) if nested else None)
        else:
            self.quant, self.compute_dtype = "int8", compute

            cb = weight.CB if getattr(weight, "CB", None) is not None else layer.state.CB
            scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
            self.register_buffer("cb", cb)
            self.register_buffer("scb", scb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.compute_dtype)
        if self.quant == "int8":
            return torch.ops.lora_fx.linear_8bit(x, self.cb, self.scb, self.bias).to(dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = torch.ops.lora_fx.linear_4bit(x, self.packed, self.absmax, self.nested_absmax, self.nested_code,
                                          self.offset, self.blocksize, self.nested_blocksize, self.quant,
                                          self.shape, bias)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}"
