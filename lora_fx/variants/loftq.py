"""LoftQ (PEFT's ``init_lora_weights="loftq"`` with ``loftq_config``): A and B from the quantization error of W, so
that a base quantized later starts close to the full-precision model. With ``Q`` bitsandbytes' NF4 (4 bits,
blocks of 64) or row-wise int8 (8 bits) quantize-then-dequantize::

    R = W;  repeat loftq_iter times:  Q = Q(R),  L Rr = rank-r SVD of (W - Q)  (L = U √S, Rr = √S Vᵀ),  R = W - L Rr
    A = Rr,  B = L,  and the base weight becomes Q (the dequantized quantized weight)

exactly as PEFT computes it (A and B carry ``W - Q`` without the scaling, as PEFT's do). The base weight is
written when the adapter is added (as PiSSA writes its residual); forward and merge are plain LoRA's. Saved
configs keep ``"loftq"`` and ``loftq_config``, so a loader re-derives Q from the original base (PEFT does this
with its CUDA code path; PEFT's LoftQ example instead saves the base holding Q and sets ``init_lora_weights=True``
in the adapter). Linear ``[out, in]`` weights in full precision; needs bitsandbytes; not routable or combinable.

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, init="loftq", loftq=(4, 1)), example_inputs=(ids,))
"""

from __future__ import annotations

import torch

from ..errors import RuleError
from .base import Variant


def quantize_dequantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """bitsandbytes' NF4 (blocks of 64, no nested statistics) or row-wise int8 round trip of float32 ``w``."""
    import bitsandbytes.functional as bf

    if bits == 4:
        packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bf.dequantize_4bit(packed, state).to(torch.float32)
    codes, scales, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
    return bf.int8_vectorwise_dequant(codes, scales).to(torch.float32)


@torch.no_grad()
def loftq(weight: torch.Tensor, bits: int, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, A, B) for ``weight`` [out, in] (see the module docstring), in float32."""
    w = weight.detach().to(torch.float32)
    residual = w
    for i in range(iters):
        q = quantize_dequantize(residual, bits)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(s[:r])
        left, right = u[:, :r] * root, root[:, None] * vh[:r]
        if i + 1 < iters:
            residual = w - left @ right
    return q, right, left


class Loftq(Variant):
    name = "loftq"
    label = "LoftQ"
    field = "init_lora_weights='loftq'"
    routable = combinable = False

    def __init__(self, bits: int, iters: int) -> None:
        self.bits, self.iters = bits, iters

    def params(self) -> tuple:
        return (self.bits, self.iters)




    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.transposed or geometry.left or geometry.quant:
            raise RuleError(f"init='loftq' on {key!r}: LoftQ quantizes a full-precision nn.Linear weight [out, in] "
                            f"(this is a {kind.name}{' with a quantized base' if geometry.quant else ''}); use "
                            "init='default' for it.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuleError(f"init='loftq' on {key!r} quantizes with bitsandbytes, which is not installed: pip "
                            "install bitsandbytes (or lora_fx[qlora]).") from None

    @torch.no_grad()
    def residual(self, unit, weight, source=None):
        q, a, b = loftq(weight, self.bits, unit.r, self.iters)
        unit.lora_A.copy_(a)
        unit.lora_B.copy_(b)
        return q.to(weight.dtype)

    def peft_config_fields(self):
        return {"loftq_config": {"loftq_bits": self.bits, "loftq_iter": self.iters}}
