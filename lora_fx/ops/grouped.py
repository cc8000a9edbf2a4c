"""``grouped_mm``: a grouped matrix product over rows sorted by group, one graph node that runs torch's native
``_grouped_mm`` kernel in eager where it has one (an autograd function, or no autograd at all when nothing needs
a gradient) and that ``torch.compile`` sees as the opaque custom op ``lora_fx::grouped_mm``::

    y[o_{e-1} : o_e] = x[o_{e-1} : o_e] @ w[e]          x [S, K], w [E, K, N], offsets o (int32, cumulative)

transformers' experts record their ``grouped_mm`` in a captured graph as its Python-loop fallback (export traces
as torch.compile does, where float32 ``grouped_mm`` is not lowered); ``capture`` swaps that node for this op, and
the expert LoRA branch (``kinds.param``) uses it for its rank-r products.

Example::

    y = grouped_mm(x_sorted, w, offsets)
"""

from __future__ import annotations

import torch


def _native(*tensors: torch.Tensor) -> bool:
    return hasattr(torch, "_grouped_mm") and all(t.device.type in ("cpu", "cuda") for t in tensors) and (
        tensors[0].device.type == "cpu" or tensors[0].dtype == torch.bfloat16)


def _kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """``w`` with a unit stride where the kernel wants one (CPU: either of the last two dims; CUDA: the
    second-last, column-major), copied only when it has none (a LoRA factor's view: E·K·r elements)."""
    if w.device.type == "cuda":
        return w if w.stride(-2) == 1 else w.transpose(1, 2).contiguous().transpose(1, 2)
    return w if 1 in (w.stride(-1), w.stride(-2)) else w.contiguous()


def _loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, stop in enumerate(offsets.tolist()):
        if stop > start:
            torch.mm(x[start:stop], w[e], out=out[start:stop])
        start = stop
    return out


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if _native(x, w):
        return torch._grouped_mm(x.contiguous(), _kernel_layout(w), offs=offsets)
    return _loop(x, w, offsets)


def _weight_grad(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor, experts: int) -> torch.Tensor:
    """``dw[e] = x_eᵀ g_e`` (2-D by 2-D grouped over the shared dimension)."""
    if _native(x, g):
        return torch._grouped_mm(x.t(), g, offs=offsets)
    out = x.new_zeros(experts, x.shape[1], g.shape[1])
    start = 0
    for e, stop in enumerate(offsets.tolist()):
        if stop > start:
            torch.mm(x[start:stop].t(), g[start:stop], out=out[e])
        start = stop
    return out


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[o_{e-1}:o_e] = x[o_{e-1}:o_e] @ w[e]``; differentiable in ``x`` and ``w``."""
    if torch.compiler.is_compiling():
        return grouped_mm_op(x, w, offsets)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _GroupedMM.apply(x, w, offsets)
    return _grouped(x, w, offsets)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        _setup(ctx, (x, w, offsets), None)
        return _grouped(x, w, offsets)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, opaque=False)


@torch.library.custom_op("lora_fx::grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _grouped(x, w, offsets)


@grouped_mm_op.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[-1])


def _setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None, offsets)
    ctx.experts = w.shape[0]


def _backward(ctx, grad, opaque: bool = True):
    """``dx = grad wᵀ`` per group, ``dw[e] = x_eᵀ grad_e``; ``opaque``: as custom ops (the compiled backward:
    inductor lowers only bf16 grouped products), else run directly (eager)."""
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = (grouped_mm_op if opaque else _grouped)(grad, w.transpose(1, 2), offsets)
    if ctx.needs_input_grad[1]:
        dw = (weight_grad_op if opaque else _weight_grad)(x, grad, offsets, ctx.experts)
    return dx, dw, None


@torch.library.custom_op("lora_fx::grouped_mm_weight_grad", mutates_args=())
def weight_grad_op(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, experts: int) -> torch.Tensor:
    return _weight_grad(x, grad, offsets, experts)


@weight_grad_op.register_fake
def _(x, grad, offsets, experts):
    return x.new_empty(experts, x.shape[1], grad.shape[1])


grouped_mm_op.register_autograd(_backward, setup_context=_setup)
