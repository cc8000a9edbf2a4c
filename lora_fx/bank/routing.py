"""The functions routed graph nodes call: each batch row gets its own adapter's LoRA delta, in one gathered
matmul per target and no loop over adapters.

With ``route[b]`` the slot of row ``b`` (``bank``), ``A[S+1, R, in]``, ``B[S+1, out, R]``, ``s[S+1]``::

    h[b]  = x[b] A[route[b]]ᵀ · s[route[b]]          (one bmm over the gathered A's)
    y'[b] = y[b] + h[b] B[route[b]]ᵀ                  (one baddbmm over the gathered B's)

A route of one slot applies that adapter to every row with plain matmuls. Without gradients the stacked
tensors are the bank's buffers; when an adapter needs gradients they are stacked from the units' parameters,
so each row's gradient reaches its own adapter (a missing key or the base slot: zeros).

Example::

    y = routed_linear(x, y, route, scales, a_bank, b_bank, (A_0, A_1), (B_0, B_1))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AdapterError


def pick_route(route: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    """The call's route, or the bank's default (the active adapter's slot) when the call passed none."""
    return default if route is None else route


def stacked(bank: torch.Tensor, units: tuple) -> torch.Tensor:
    """The bank's buffer, or, when a unit needs gradients, the same values stacked from the units."""
    if not torch.is_grad_enabled() or not any(u is not None and u.requires_grad for u in units):
        return bank
    zeros = torch.zeros_like(bank[0])
    return torch.stack([u if u is not None else zeros for u in units] + [zeros])


def rows(route: torch.Tensor, n: int) -> torch.Tensor:
    """The route for ``n`` leading rows: a batch flattened to ``batch * T`` rows repeats each row's slot."""
    if route.numel() == n:
        return route
    if n % route.numel():
        raise AdapterError(f"adapter_names gives {route.numel()} rows, but a routed layer reads a tensor with "
                           f"{n} rows; pass one adapter name per row of the batch.")
    return route.repeat_interleave(n // route.numel())


def _out(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (y + delta.view(y.shape)).to(y.dtype)


def routed_linear(x: torch.Tensor, y: torch.Tensor, route: torch.Tensor, scales: torch.Tensor,
                  a_bank: torch.Tensor, b_bank: torch.Tensor, a_units: tuple, b_units: tuple) -> torch.Tensor:
    """``y + s · B A x`` with each row's own adapter (see the module docstring)."""
    a, b = stacked(a_bank, a_units), stacked(b_bank, b_units)
    x = x.to(a.dtype)
    if route.numel() == 1:
        h = F.linear(x, a.index_select(0, route)[0]) * scales.index_select(0, route)
        return _out(y, F.linear(h, b.index_select(0, route)[0]))
    r = rows(route, x.shape[0])
    xb = x.reshape(x.shape[0], -1, x.shape[-1])
    h = torch.bmm(xb, a.index_select(0, r).transpose(1, 2)) * scales.index_select(0, r).view(-1, 1, 1)
    b_rows = b.index_select(0, r).transpose(1, 2)
    if y.dtype == h.dtype:
        return torch.baddbmm(y.reshape(xb.shape[0], -1, y.shape[-1]), h, b_rows).view(y.shape)
    return _out(y, torch.bmm(h, b_rows))


def routed_embedding(idx: torch.Tensor, y: torch.Tensor, route: torch.Tensor, scales: torch.Tensor,
                     a_bank: torch.Tensor, b_bank: torch.Tensor, a_units: tuple, b_units: tuple,
                     padding_idx: int | None = None) -> torch.Tensor:
    """``y + s · emb(idx, Aᵀ) Bᵀ`` with each row's own adapter (A ``[R, V]``, B ``[dim, R]``); as in
    ``F.embedding``, the ``padding_idx`` row gets no gradient."""
    a, b = stacked(a_bank, a_units), stacked(b_bank, b_units)
    r = route.expand(idx.shape[0]) if route.numel() == 1 else rows(route, idx.shape[0])
    ib = idx.reshape(idx.shape[0], -1)
    h = a.transpose(1, 2)[r.view(-1, 1), ib]  # [B, T, R]
    if padding_idx is not None and h.requires_grad:
        h = torch.where((ib == padding_idx).unsqueeze(-1), h.detach(), h)
    h = h * scales.index_select(0, r).view(-1, 1, 1)
    return _out(y, torch.bmm(h, b.index_select(0, r).transpose(1, 2)))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def routed_conv(x: torch.Tensor, y: torch.Tensor, route: torch.Tensor, scales: torch.Tensor,
                a_bank: torch.Tensor, b_bank: torch.Tensor, a_units: tuple, b_units: tuple, stride, padding,
                dilation) -> torch.Tensor:
    """``y + s · conv_B(conv_A(x))`` with each row's own adapter: the rows' A's (and B's) run as one grouped
    convolution (``groups = batch``)."""
    a, b = stacked(a_bank, a_units), stacked(b_bank, b_units)
    conv = _CONV[a.dim() - 3]
    x = x.to(a.dtype)
    if route.numel() == 1:
        h = conv(x, a.index_select(0, route)[0], None, stride, padding, dilation)
        s = scales.index_select(0, route).view(1, 1, *([1] * (h.dim() - 2)))
        return _out(y, conv(h * s, b.index_select(0, route)[0]))
    n = x.shape[0]
    r = rows(route, n)
    a_rows = a.index_select(0, r).flatten(0, 1)  # [n*R, C, k...]
    h = conv(x.reshape(1, -1, *x.shape[2:]), a_rows, None, stride, padding, dilation, n)
    h = h.view(n, -1, *h.shape[2:]) * scales.index_select(0, r).view(n, 1, *([1] * (h.dim() - 2)))
    b_rows = b.index_select(0, r).flatten(0, 1)  # [n*out, R, 1...]
    delta = conv(h.reshape(1, -1, *h.shape[2:]), b_rows, None, 1, 0, 1, n)
    return _out(y, delta.view(n, -1, *delta.shape[2:]))
