"""The init registry: every value of ``init`` / PEFT's ``init_lora_weights`` lora_fx knows, and the inits that take
A and B from the base weight (PiSSA and OLoRA), as PEFT computes them.

- ``True`` / ``"default"``: A kaiming-uniform, B zero (a conv/linear; an embedding: A zero, B normal);
- ``"gaussian"``: A ~ N(0, 1/r), B zero; ``False``: A and B both random (the layer changes at once);
- ``"mica"``: B from W's minor singular vectors, A zero, B frozen: the MiCA variant (``variants.mica``);
- ``"orthogonal"`` (linear, even r): with Q from the QR of an ``r x r`` normal matrix, ``A = (G_in Q_odd)ᵀ / 10`` and
  ``B = G_outᵀ Q_even / 10`` (``G`` normal draws): both nonzero, yet ``B A = 0`` since Q's even and odd rows are
  orthogonal;
- PiSSA: ``W = U S Vᵀ``; with ``S_r`` the top r singular values divided by ``s``, ``A = √S_r V_rᵀ``,
  ``B = U_r √S_r`` and the base keeps the residual ``W_res = W - s·B A`` (``"pissa_niter_K"``: the same from a
  randomized ``svd_lowrank`` with K iterations);
- OLoRA: ``W = Q R``; ``A = R_r``, ``B = Q_r`` and ``W_res = W - s·B A``.

At init the adapted layer computes ``W_res + s·B A = W``: outputs are unchanged.

Example::

    w_res = svd_init(unit, weight)   # sets unit.lora_A / lora_B, returns the residual weight (not yet written)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..errors import RuleError

if TYPE_CHECKING:
    from ..adapters.unit import LoraUnit

RANDOM_INITS = (True, False, "default", "gaussian", "orthogonal", "eva")  # eva: B zero, A until EVA sets it
VARIANT_INITS = ("mica", "loftq", "lora_ga", "corda")  # inits that are variants of their own (``variants.mica``, ...)
WEIGHT_INITS = ("pissa", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")
NAMES = (*RANDOM_INITS, *VARIANT_INITS, *WEIGHT_INITS, "pissa_niter_<K>")


def is_weight_init(init: object) -> bool:
    """Whether ``init`` takes A and B from the base weight (and rewrites the weight to the residual)."""
    return isinstance(init, str) and (init in WEIGHT_INITS or _NITER.fullmatch(init) is not None)


def is_init(init: object) -> bool:
    return (isinstance(init, (bool, str)) and init in (*RANDOM_INITS, *VARIANT_INITS)) or is_weight_init(init)


def random_part(init: bool | str) -> bool | str:
    """What the kind's random init draws for ``init``: a weight init or the orthogonal one keeps the first draw only
    (PEFT's order: the layers' own init, then the scheme's)."""
    if init == "eva":
        return True
    return False if is_weight_init(init) or init in ("orthogonal", *VARIANT_INITS) else init


@torch.no_grad()
def orthogonal_init(unit: LoraUnit) -> None:
    """PEFT's ``orthogonal`` init (see the module docstring), with its draws in its order (CPU, float32)."""
    r = unit.r
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(unit.geometry.in_features, r // 2).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, unit.geometry.out_features).T.mm(q[1::2, :]) / 10.0
    unit.lora_A.copy_(a)
    unit.lora_B.copy_(b)


def check_target(init: bool | str, key: str, kind: Any, geometry: Any, r: int = 2) -> None:
    """Refuse an init this target cannot take (RuleError naming the key)."""
    if init == "orthogonal" and kind.name != "linear":
        raise RuleError(f"init='orthogonal' on {key!r}: PEFT defines it for linear layers (this is a {kind.name}); "
                        "use init='default' for it.")
    if init == "orthogonal" and r % 2:
        raise RuleError(f"init='orthogonal' on {key!r} needs an even rank (it splits an r x r orthogonal matrix in "
                        f"two), got r={r}.")
    if not is_weight_init(init):
        return
    if not kind.supports_weight_init:
        raise RuleError(f"init={init!r} on {key!r}: PiSSA/OLoRA apply to linear layers only (this is a "
                        f"{kind.name}); use init='default' for it.")
    if getattr(geometry, "quant", ""):
        raise RuleError(f"{init!r} on {key!r}: its base weight is quantized ({geometry.quant}) and would have to be "
                        "dequantized and rewritten; use plain LoRA there.")
    if init == "olora" and getattr(geometry, "transposed", False):
        raise RuleError(f"init='olora' on {key!r}: its weight is stored [in, out] (GPT-2's Conv1D), where PEFT "
                        "computes OLoRA on the untransposed weight; checkpoints would not interchange. Use 'pissa'.")


@torch.no_grad()
def svd_init(unit: LoraUnit, weight: torch.Tensor) -> torch.Tensor:
    """Set ``unit``'s A and B by its init scheme; return the residual base weight (not yet written)."""
    transposed = unit.geometry.transposed
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
