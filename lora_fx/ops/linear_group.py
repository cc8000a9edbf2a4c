"""Sibling linear layers and their LoRA branches as one op: the base GEMMs and the adapters' together.

For siblings reading the same ``x`` (``q, k, v = W_q x, W_k x, W_v x``) with adapters ``(A_i, B_i, s_i)``::

    h   = x [A_1; A_2; ...]ᵀ                    one GEMM for every A
    y_i = x W_iᵀ + b_i + s_i · h_i B_iᵀ          the base GEMM, then B's GEMM added into its fresh output

Backward, for output gradients ``g_i``::

    dh_i = s_i g_i B_i        dB_i = s_i g_iᵀ h_i          (g_i read once from memory: the second GEMM finds it hot)
    dx   = Σ g_i W_i + dh [A_1; A_2; ...]                   every term accumulated into one buffer (no adds)
    dA   = dhᵀ x              (dW_i = g_iᵀ x, db_i = Σ g_i only where the base weights train)

Owning the base GEMMs is what saves the memory passes: the branch's ``dx`` lands in the base's ``dx`` while it is
hot instead of being written out and added by autograd, and the siblings' base ``dx`` terms accumulate in place.
With dropout the branch reads ``xa = dropout(x)`` and its ``dx`` goes to ``xa``.

Example::

    q, k, v = linear_lora_group(x, None, (W_q, W_k, W_v), (None,) * 3, (A_q, A_k, A_v), (B_q, B_k, B_v), (2.0,) * 3)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .group import a_grads, branch_grads, lora_linear_group


class _LinearLoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xa, scalings, n, biased, *tensors):
        ws, rest = tensors[:n], tensors[n:]
        nb = sum(biased)
        biases, a_list, b_list = iter(rest[:nb]), rest[nb:nb + n], rest[nb + n:]
        x2 = x.reshape(-1, x.shape[-1])
        xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1])
        h = xa2 @ (torch.cat(a_list) if n > 1 else a_list[0]).t()
        ranks = [a.shape[0] for a in a_list]
        outs = []
        for w, has_bias, h_i, b, s in zip(ws, biased, h.split(ranks, dim=1), b_list, scalings):
            out = x2.new_empty(*x.shape[:-1], w.shape[0])  # returned itself, not a view: callers may modify it
            y = out.view(-1, w.shape[0])
            if has_bias:
                torch.addmm(next(biases), x2, w.t(), out=y)
            else:
                torch.mm(x2, w.t(), out=y)
            y.addmm_(h_i, b.t(), alpha=s)
            outs.append(out)
        keep_x = xa is None or any(ctx.needs_input_grad[5:5 + n])  # with dropout, x serves dW only
        ctx.save_for_backward(x2 if keep_x else None, xa2 if xa is not None else None, h, *ws, *a_list, *b_list)
        ctx.scalings, ctx.ranks, ctx.biased = scalings, ranks, biased
        ctx.x_shape, ctx.xa_shape = x.shape, None if xa is None else xa.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa2, h, *tensors = ctx.saved_tensors
        n = len(grads)
        ws, a_list, b_list = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        needs = ctx.needs_input_grad
        nb = sum(ctx.biased)
        need_w, need_bias = needs[5:5 + n], needs[5 + n:5 + n + nb]
        need_a, need_b = needs[5 + n + nb:5 + 2 * n + nb], needs[5 + 2 * n + nb:]
        own = ctx.xa_shape is None
        xa2 = x2 if own else xa2
        g2s = [g.reshape(-1, g.shape[-1]) for g in grads]
        dh, db_list = branch_grads(g2s, h, b_list, ctx.scalings, ctx.ranks, need_b)
        a_cat = torch.cat(a_list) if n > 1 else a_list[0]
        dx = dxa = None
        if needs[0]:
            dx = g2s[0] @ ws[0]
            for g2, w in zip(g2s[1:], ws[1:]):
                dx.addmm_(g2, w)
            if own:
                dx.addmm_(dh, a_cat)
            dx = dx.view(ctx.x_shape)
        if not own and needs[1]:
            dxa = (dh @ a_cat).view(ctx.xa_shape)
        da = a_grads(dh, xa2, ctx.ranks) if any(need_a) else (None,) * n
        dw_list = [g2.t() @ x2 if need else None for g2, need in zip(g2s, need_w)]
        dbias = [g2.sum(0) if need else None for g2, need in zip((g for g, b in zip(g2s, ctx.biased) if b), need_bias)]
        return (dx, dxa, None, None, None, *dw_list, *dbias, *da, *db_list)


def linear_lora_group(x: torch.Tensor, xa: torch.Tensor | None, weights: tuple, biases: tuple, a_list: tuple,
                      b_list: tuple, scalings: tuple) -> tuple:
    """``y_i = F.linear(x, W_i, b_i) + s_i · F.linear(F.linear(xa, A_i), B_i)`` for sibling linear layers reading
    ``x`` (``xa``: the branch's input when it differs, e.g. after dropout; None: ``x``).

    Under ``torch.compile`` (the compiler derives the backward and fuses around the GEMMs; tracing the
    autograd op instead measured 3 s more warm compile for steps 0.3-2.5% faster), under autocast (which picks
    the matmul dtypes) or when nothing needs a gradient it runs as plain ops; otherwise as one autograd op
    (module docstring).

    Example::

        (y,) = linear_lora_group(x, None, (W,), (b,), (A,), (B,), (2.0,))   # F.linear(x, W, b) + 2·B A x
    """
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, xa, *weights, *biases, *a_list, *b_list))
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or not grad:
        ys = tuple(F.linear(x, w, b) for w, b in zip(weights, biases))
        return lora_linear_group(x if xa is None else xa, ys, a_list, b_list, scalings, inplace=True)
    biased = tuple(b is not None for b in biases)
    return _LinearLoraGroup.apply(x, xa, tuple(scalings), len(weights), biased, *weights,
                                  *(b for b in biases if b is not None), *a_list, *b_list)
