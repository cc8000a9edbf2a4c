"""Initialisations that rewrite the base weight: PiSSA and OLoRA, as PEFT computes them.

PiSSA: ``W = U S Vᵀ``; with ``S_r`` the top r singular values divided by ``s``,
``A = √S_r V_rᵀ``, ``B = U_r √S_r`` and the base keeps the residual ``W_res = W - s·B A``
(``"pissa_niter_K"``: the same from a randomized ``svd_lowrank`` with K iterations).
OLoRA: ``W = Q R``; ``A = R_r``, ``B = Q_r`` and ``W_res = W - s·B A``.
At init the adapted layer computes ``W_res + s·B A = W``: outputs are unchanged.

Example::

    w_res = svd_init(unit, weight)   # sets unit.lora_A / lora_B, returns the residual weight
"""

from __future__ import annotations

import re

import torch

from .errors import RuleError
from .store import LoraUnit

_NITER = re.compile(r"pissa_niter_(\d+)")


def is_weight_init(init: object) -> bool:
    return isinstance(init, str) and (init in ("pissa", "olora") or _NITER.fullmatch(init) is not None)


@torch.no_grad()
def svd_init(unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor:
    """Set ``unit``'s A and B by its init scheme; return the residual base weight (not yet written)."""
    transposed = unit.geometry.transposed
    if unit.init == "olora" and transposed:
        raise RuleError(f"init='olora' on {unit.key!r}: its weight is stored [in, out] (GPT-2's Conv1D), where PEFT "
                        "computes OLoRA on the untransposed weight; checkpoints would not interchange. Use 'pissa'.")
    w = weight.detach().float()
    w = w.T if transposed else w
    r, s = unit.r, unit.scaling
    if unit.init == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r], q[:, :r]
    else:
        m = _NITER.fullmatch(unit.init)
        if m:
            v, sv, u = torch.svd_lowrank(w, r, niter=int(m.group(1)))
            uh = u.t()
        else:
            v, sv, uh = torch.linalg.svd(w, full_matrices=False)
            v, sv, uh = v[:, :r], sv[:r], uh[:r]
        sv = sv / s
        a = torch.diag(torch.sqrt(sv)) @ uh
        b = v @ torch.diag(torch.sqrt(sv))
    unit.lora_A.copy_(a.contiguous())
    unit.lora_B.copy_(b.contiguous())
    residual = w - s * unit.lora_B.float() @ unit.lora_A.float()
    return (residual.T if transposed else residual).to(weight.dtype)
