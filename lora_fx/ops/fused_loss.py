"""The language-model loss without the logits: ``cross_entropy(h Wᵀ + b + s·(h Aᵀ) Bᵀ, labels)`` computed a chunk of
tokens at a time, so the ``[tokens, vocab]`` logits never exist whole, in forward or in backward.

For each chunk of rows ``h_c`` (hidden states already aligned with their labels ``y_c``)::

    z_c   = (h_c Wᵀ + b + s · (h_c Aᵀ) Bᵀ).to(dtype)           logits of the chunk only (float32, as transformers)
    ℓ_c   = logsumexp(z_c) - z_c[y_c]          (rows with y = ignore_index count 0)
    g_c   = (softmax(z_c) - onehot(y_c)) / d   (d: the number of counted rows, or the caller's divisor)
    dh_c  = g_c W + s · (g_c B) A              dW += g_cᵀ h_c, db += Σ g_c, dB += s · g_cᵀ (h_c Aᵀ)

The gradients are computed in forward (they need the chunk's softmax) and scaled by the incoming gradient in
backward, as Liger-Kernel does; memory is one chunk of logits plus ``dh`` (the size of ``h``) instead of the whole
logits, their float copy, their log-softmax and its gradient. ``reduction`` is ``cross_entropy``'s: "mean" divides
by the counted rows, "sum" does not (transformers then divides by ``num_items_in_batch``).

Example::

    loss = linear_cross_entropy(h.view(-1, d), lm_head.weight, None, None, None, None, 0.0, labels.view(-1),
                                dtype=torch.float32)
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MiB in float32): few chunks, so W is read few times


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, hl, lora_a, lora_b, scaling, labels, ignore_index, reduction, dtype):
        n, vocab = h.shape[0], weight.shape[0]
        need = ctx.needs_input_grad
        valid = labels != ignore_index
        divisor = valid.sum().to(dtype) if reduction == "mean" else torch.ones((), dtype=dtype, device=h.device)
        lora = lora_a is not None
        own = hl is None  # the branch reads h itself (no dropout)
        hl = h if own else hl
        ha = hl @ lora_a.t() if lora else None
        dh = torch.empty_like(h) if need[0] else None
        dw = torch.zeros(weight.shape, dtype=dtype, device=h.device) if need[1] else None
        db = torch.zeros(vocab, dtype=dtype, device=h.device) if bias is not None and need[2] else None
        dhl = torch.empty_like(hl) if lora and not own and need[3] else None
        dha = torch.empty_like(ha) if lora and (need[0] or need[3] or need[4]) else None
        db_lora = torch.zeros(lora_b.shape, dtype=dtype, device=h.device) if lora and need[5] else None
        total = torch.zeros((), dtype=dtype, device=h.device)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, n, step):
            stop = min(start + step, n)
            hc, yc, vc = h[start:stop], labels[start:stop], valid[start:stop]
            z = torch.addmm(bias, hc, weight.t()) if bias is not None else hc @ weight.t()
            if lora:
                z.addmm_(ha[start:stop], lora_b.t(), alpha=scaling)
            z = z.to(dtype)
            rows = torch.arange(stop - start, device=h.device)
            target = yc.clamp(min=0)
            picked = z[rows, target]
            peak = z.amax(dim=-1)
            g = z.sub_(peak[:, None]).exp_()  # exp(z - max), in place of the logits: one pass over them
            norm = g.sum(dim=-1)
            total += ((norm.log() + peak - picked) * vc).sum()
            if not any(need[:6]):
                continue
            weight_rows = vc.to(dtype) / divisor
            g.mul_((weight_rows / norm)[:, None])  # softmax, weighted by the row's share of the loss
            g[rows, target] -= weight_rows
            gh = g.to(h.dtype)
            if dh is not None:
                torch.mm(gh, weight, out=dh[start:stop])
            if dha is not None:
                torch.mm(gh, lora_b, out=dha[start:stop]).mul_(scaling)
                if own and dh is not None:
                    dh[start:stop].addmm_(dha[start:stop], lora_a)
                elif dhl is not None:
                    torch.mm(dha[start:stop], lora_a, out=dhl[start:stop])
            if dw is not None:
                dw.addmm_(g.t(), hc.to(dtype))
            if db is not None:
                db += g.sum(0)
            if db_lora is not None:
                db_lora.addmm_(g.t(), ha[start:stop].to(dtype), alpha=scaling)
        da = dha.t() @ hl if lora and need[4] else None
        kept = (dh, dw, db, dhl, da, db_lora)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in kept))
        ctx.present = tuple(t is not None for t in kept)
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (h, weight, bias, hl, lora_a, lora_b))
        return total / divisor

    @staticmethod
    def backward(ctx, grad):
        grads = [(t * grad).to(dtype) if present else None
                 for t, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


@torch.compiler.disable  # a Python loop over chunks: compiled code calls it as it is
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hl: torch.Tensor | None,
                         lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
                         labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, W, b) + s·F.linear(F.linear(hl, A), B), labels)`` over rows of ``h`` ``[N, d]``
    and ``labels`` ``[N]``, computed in chunks of rows (see the module docstring); ``hl``: the LoRA branch's input
    when it differs from ``h`` (dropout), else None; ``dtype``: what the logits are cast to before the loss
    (transformers' ``logits.float()``: float32; None: ``h``'s dtype)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: the fused loss computes 'mean' or 'sum'.")
    return _LinearCrossEntropy.apply(h, weight, bias, hl, lora_a, lora_b, float(scaling), labels, int(ignore_index),
                                     reduction, dtype or h.dtype)
