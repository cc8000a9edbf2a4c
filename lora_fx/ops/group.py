"""The sibling branches' op (beside base outputs that stay module calls) and its gradient pieces.

(The op that owns the base GEMMs as well is ``linear_group``; PEFT's DoRA forwards are ``dora``; the math on
weights, ``ΔW`` per kind, lives with each kind: ``kinds``.)

Example::

    q, k, v = lora_linear_group(x, (q, k, v), (A_q, A_k, A_v), (B_q, B_k, B_v), (2.0, 2.0, 2.0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LoraLinearGroup(torch.autograd.Function):
    """``y_i += s_i · (x A_iᵀ) B_iᵀ`` for sibling branches reading the same ``x``, in place on the base outputs.

    Forward: one GEMM for all A's (``h = x [A_1; A_2; ...]ᵀ``), then one ``addmm_`` per branch that adds
    ``s_i · h_i B_iᵀ`` into ``y_i`` (no separate multiply or add kernels; out of place when ``y_i`` is a view).
    Backward: ``dh_i = s_i g_i B_i`` and ``dB_i = s_i gᵢᵀ h_i`` (``branch_grads``), and one GEMM each for
    ``dA = dhᵀ x`` and ``dx = dh A`` over the whole group.
    """

    @staticmethod
    def forward(ctx, x, scalings, n, inplace, *tensors):
        ys, a_list, b_list = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat(a_list) if n > 1 else a_list[0]
        h = x2 @ a_cat.t()
        ranks = [a.shape[0] for a in a_list]
        outs, dirty = [], []
        for y, h_i, b, s in zip(ys, h.split(ranks, dim=1), b_list, scalings):
            if _writes_in_place(y, inplace):
                y.view(-1, y.shape[-1]).addmm_(h_i, b.t(), alpha=s)
                outs.append(y)
                dirty.append(y)
            else:  # a fresh output (not a view of one: callers may modify it in place)
                out = torch.empty_like(y, memory_format=torch.contiguous_format)
                torch.addmm(y.reshape(-1, y.shape[-1]), h_i, b.t(), alpha=s, out=out.view(-1, y.shape[-1]))
                outs.append(out)
        ctx.mark_dirty(*dirty)
        ctx.save_for_backward(x2, h, *a_list, *b_list)  # the A's themselves: no saved concatenation
        ctx.scalings, ctx.ranks, ctx.x_shape = scalings, ranks, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, h, *ab = ctx.saved_tensors
        n = len(ab) // 2
        a_list, b_list = ab[:n], ab[n:]
        needs = ctx.needs_input_grad
        g2s = [g.reshape(-1, g.shape[-1]) for g in grads]
        dh, db_list = branch_grads(g2s, h, b_list, ctx.scalings, ctx.ranks, needs[4 + 2 * n:])
        dx = (dh @ (torch.cat(a_list) if n > 1 else a_list[0])).view(ctx.x_shape) if needs[0] else None
        da = a_grads(dh, x2, ctx.ranks) if any(needs[4 + n:4 + 2 * n]) else (None,) * n
        return (dx, None, None, None, *grads, *da, *db_list)


def branch_grads(g2s: list, h: torch.Tensor, b_list, scalings, ranks, need_b) -> tuple:
    """``dh = [s_1 g_1 B_1, s_2 g_2 B_2, ...]`` (concatenated) and ``dB_i = s_i g_iᵀ h_i`` for 2-D output
    gradients ``g_i``. ``dh_i`` comes first: it reads ``g_i`` from memory and ``dB_i``'s GEMM then finds it in
    cache (measured: the cheaper order on CPU)."""
    dh_list, db_list = [], []
    for g2, h_i, b, s, need in zip(g2s, h.split(ranks, dim=1), b_list, scalings, need_b):
        dh_list.append(torch.mm(g2, b).mul_(s))
        db_list.append(torch.mm(g2.t(), h_i).mul_(s) if need else None)
    return (torch.cat(dh_list, dim=1) if len(dh_list) > 1 else dh_list[0]), db_list


def a_grads(dh: torch.Tensor, x2: torch.Tensor, ranks: list) -> tuple:
    """``dA = dhᵀ x`` for the whole group, split per branch; computed as ``(xᵀ dh)ᵀ`` (the faster GEMM shape
    with MKL here) and made contiguous, so each A's gradient is a plain row block."""
    return torch.mm(x2.t(), dh).t().contiguous().split(ranks)


def _writes_in_place(y: torch.Tensor, inplace: bool) -> bool:
    """Add into the base output itself only when nothing else can see it (see ``lora_linear_group``)."""
    return inplace and not torch.compiler.is_compiling() and not y._is_view() and y.is_contiguous()


def lora_linear_group(x: torch.Tensor, ys: tuple, a_list: tuple, b_list: tuple, scalings: tuple,
                      inplace: bool = False) -> tuple:
    """Add the LoRA deltas of sibling linear targets that read ``x`` into their base outputs ``ys``.

    Example::

        q, k, v = lora_linear_group(x, (q, k, v), (A_q, A_k, A_v), (B_q, B_k, B_v), (2.0, 2.0, 2.0))

    Under ``torch.compile`` it traces as plain ops, which the compiler fuses itself; with no grad needed it
    skips autograd. ``inplace``: the ``ys`` are fresh op outputs nothing else can see (the graph says so for
    ``call_function`` base nodes; a module's output may have been kept by a hook), so the deltas may be added
    into them; otherwise new tensors are returned.
    """
    if (torch.compiler.is_compiling()  # plain ops, which the compiler fuses around; one GEMM for all A's
            or torch.is_autocast_enabled(x.device.type)  # autocast picks the matmul dtypes
            or any(y.dtype != a.dtype for y, a in zip(ys, a_list))):
        x2 = x.reshape(-1, x.shape[-1])
        hs = (x2 @ torch.cat(a_list).t()).split([a.shape[0] for a in a_list], dim=-1) if len(a_list) > 1 else (
            x2 @ a_list[0].t(),)
        return tuple(torch.addmm(y.reshape(-1, y.shape[-1]), h, b.t(), alpha=s).view(y.shape)  # no extra kernel
                     if y.dtype == h.dtype == b.dtype else y + (h @ b.t()).view(y.shape) * s
                     for y, h, b, s in zip(ys, hs, b_list, scalings))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *a_list, *b_list)):
        return _LoraLinearGroup.apply(x, tuple(scalings), len(ys), inplace, *ys, *a_list, *b_list)
    x2 = x.reshape(-1, x.shape[-1])  # inference: the same math with no autograd bookkeeping
    hs = F.linear(x2, torch.cat(a_list)).split([a.shape[0] for a in a_list], dim=1) if len(a_list) > 1 else (
        F.linear(x2, a_list[0]),)
    outs = []
    for y, h, b, s in zip(ys, hs, b_list, scalings):
        if _writes_in_place(y, inplace):
            y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=s)
            outs.append(y)
        else:
            outs.append(torch.addmm(y.reshape(-1, y.shape[-1]), h, b.t(), alpha=s).view(y.shape))
    return tuple(outs)
