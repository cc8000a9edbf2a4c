"""The fused op that owns sibling base GEMMs and their LoRA branches: outputs and every gradient equal the plain
ops' (``F.linear(x, W, b) + s · B A xa``), whichever inputs need gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from lora_fx.ops.linear_group import linear_lora_group


def _inputs(n, biased, ranks, x_grad, w_grad, shape=(2, 5, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    outs = [7, 12, 3][:n]
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(x_grad)
    ws = [torch.randn(o, d, generator=g, dtype=torch.float64).requires_grad_(w_grad) for o in outs]
    bs = [torch.randn(o, generator=g, dtype=torch.float64).requires_grad_(w_grad) if b else None
          for o, b in zip(outs, biased)]
    As = [torch.randn(r, d, generator=g, dtype=torch.float64).requires_grad_() for r in ranks]
    Bs = [torch.randn(o, r, generator=g, dtype=torch.float64).requires_grad_() for o, r in zip(outs, ranks)]
    return x, ws, bs, As, Bs


def _reference(x, xa, ws, bs, As, Bs, scalings):
    xa = x if xa is None else xa
    return [F.linear(x, w, b) + s * F.linear(F.linear(xa, a), bb) for w, b, a, bb, s in zip(ws, bs, As, Bs, scalings)]


def _grads(outs, leaves):
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
               for i, o in enumerate(outs)]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    present = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, present, retain_graph=True)


@pytest.mark.parametrize("n,biased,ranks,scalings", [
    (1, (False,), (4,), (2.0,)),
    (1, (True,), (2,), (0.5,)),
    (3, (True, False, True), (4, 2, 3), (2.0, 0.25, 1.0)),
])
@pytest.mark.parametrize("x_grad,w_grad,dropout", [
    (False, False, False), (True, False, False), (True, True, False), (True, False, True), (False, False, True),
])
def test_outputs_and_gradients_equal_plain_ops(n, biased, ranks, scalings, x_grad, w_grad, dropout):
    x, ws, bs, As, Bs = _inputs(n, biased, ranks, x_grad, w_grad)
    xa = None
    if dropout:  # the branch reads its own input, which carries a gradient back to x through the mask
        mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) > 0.3).double() / 0.7
        xa = x * mask if x_grad else (x * mask).requires_grad_()
    outs = linear_lora_group(x, xa, tuple(ws), tuple(bs), tuple(As), tuple(Bs), scalings)
    ref = _reference(x, xa, ws, bs, As, Bs, scalings)
    for o, r in zip(outs, ref):
        assert o.shape == r.shape and rel_err(o, r) < 1e-12
    leaves = [x, xa if xa is not None and xa.is_leaf else None, *ws, *bs, *As, *Bs]
    for got, want in zip(_grads(outs, leaves), _grads(ref, leaves)):
        assert rel_err(got, want) < 1e-12


def test_no_grad_and_non_contiguous_input():
    x, ws, bs, As, Bs = _inputs(3, (True, True, False), (2, 2, 2), False, False, shape=(4, 3, 12))
    xt = x.transpose(0, 1)  # [3, 4, 12], not contiguous
    with torch.no_grad():
        outs = linear_lora_group(xt, None, tuple(ws), tuple(bs), tuple(As), tuple(Bs), (2.0,) * 3)
        ref = _reference(xt, None, ws, bs, As, Bs, (2.0,) * 3)
    assert all(rel_err(o, r) < 1e-12 for o, r in zip(outs, ref))
    outs = linear_lora_group(xt, None, tuple(ws), tuple(bs), tuple(As), tuple(Bs), (2.0,) * 3)
    ref = _reference(xt, None, ws, bs, As, Bs, (2.0,) * 3)
    for got, want in zip(_grads(outs, As + Bs), _grads(ref, As + Bs)):
        assert rel_err(got, want) < 1e-12


def test_autocast_runs_the_plain_ops_in_the_autocast_dtype():
    x, ws, bs, As, Bs = _inputs(2, (True, False), (2, 2), True, False)
    x, ws = x.detach().float().requires_grad_(), [w.detach().float() for w in ws]
    bs = [b.detach().float() if b is not None else None for b in bs]
    As, Bs = [a.detach().float().requires_grad_() for a in As], [b.detach().float().requires_grad_() for b in Bs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = linear_lora_group(x, None, tuple(ws), tuple(bs), tuple(As), tuple(Bs), (2.0, 2.0))
        ref = _reference(x, None, ws, bs, As, Bs, (2.0, 2.0))
    assert all(o.dtype == r.dtype == torch.bfloat16 for o, r in zip(outs, ref))
    assert all(rel_err(o, r) < 2e-2 for o, r in zip(outs, ref))
    sum(o.float().sum() for o in outs).backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float32 for a in As)
