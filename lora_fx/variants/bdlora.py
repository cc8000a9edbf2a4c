"""BD-LoRA (PEFT's ``use_bdlora``): one factor block-diagonal with ``nblocks`` blocks, so a sharded serving engine
needs no communication for the adapter. Side "A": A is ``blockdiag(A_1 .. A_n)``, each ``[r/n, in/n]``, held packed
as ``[r, in/n]`` (PEFT's ``BlockDiagonalLinear.weight``); side "B": B is ``blockdiag(B_1 .. B_n)``, each
``[out/n, r/n]``, held as ``[out, r/n]``::

    y' = y + s · B A x        with the block-diagonal factor applied block by block (no dense copy)

PEFT's init: the dense layers' draws as plain LoRA, then a side-A block drawn kaiming-uniform (a = 0), a side-B
block zeros. Linear targets; not routable, fusable or combinable.

Example::

    Rule("q_proj", r=8, block_diagonal=("B", 2))        # or LoraConfig(use_bdlora=BdLoraConfig(...))
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ..errors import RuleError
from .base import Variant, dense_draws


def block_diagonal(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The dense matrix of a packed block-diagonal factor ``[rows, cols/n]``: its n row-chunks on the diagonal."""
    return torch.block_diag(*torch.chunk(w, nblocks, dim=0))


def block_linear(x: torch.Tensor, w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """``F.linear(x, block_diagonal(w, n))`` block by block (PEFT's ``BlockDiagonalLinear.forward``)."""
    first = x.shape[:-1]
    m, n = x.shape[-1] // nblocks, w.shape[0] // nblocks
    out = torch.einsum("bim,inm->bin", x.reshape(-1, nblocks, m), w.view(nblocks, n, m))
    return out.reshape(*first, -1)


class BdLora(Variant):
    name = "bdlora"
    label = "BD-LoRA"
    field = "use_bdlora"
    routable = fusable = combinable = False

    def __init__(self, side: str, nblocks: int) -> None:
        self.side, self.nblocks = side, nblocks

    def params(self) -> tuple:
        return (self.side, self.nblocks)





    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        if kind.name != "linear" or geometry.transposed or geometry.left or geometry.quant:
            raise RuleError(f"BD-LoRA on {key!r}: PEFT defines it for nn.Linear layers (W [out, in]); use plain LoRA "
                            "for this key.")
        sizes = {"r": r, "in": geometry.in_features} if self.side == "A" else {"r": r, "out": geometry.out_features}
        bad = {k: v for k, v in sizes.items() if v % self.nblocks}
        if bad:
            raise RuleError(f"BD-LoRA on {key!r}: {bad} not divisible by nblocks={self.nblocks}.")

    def shapes(self, kind, geometry, r):
        (ra, ina), (outb, rb) = kind.shapes(geometry, r)
        if self.side == "A":
            return (ra, ina // self.nblocks), (outb, rb)
        return (ra, ina), (outb, rb // self.nblocks)

    @torch.no_grad()
    def reset(self, unit, init) -> bool:
        """PEFT's draws: the dense layers as plain LoRA's, then the block-diagonal factor's own."""
        a, b = dense_draws(unit, init)
        if self.side == "A":
            block = torch.empty(unit.lora_A.shape)
            torch.nn.init.kaiming_uniform_(block)
            unit.lora_A.copy_(block)
            unit.lora_B.copy_(b)
        else:
            unit.lora_A.copy_(a)
            unit.lora_B.zero_()
        return True

    def whole_a(self, unit, a=None):
        a = unit.lora_A if a is None else a
        return block_diagonal(a, self.nblocks) if self.side == "A" else a

    def whole_b(self, unit, b=None):
        b = unit.lora_B if b is None else b
        return block_diagonal(b, self.nblocks) if self.side == "B" else b

    def delta(self, unit, dtype=torch.float32):
        a = self.whole_a(unit, unit.lora_A.detach().to(dtype))
        b = self.whole_b(unit, unit.lora_B.detach().to(dtype))
        return unit.strategy.delta(a, b, unit.scaling, unit.geometry)

    def eager_a(self, unit, x):
        return block_linear(x, unit.lora_A, self.nblocks) if self.side == "A" else F.linear(x, unit.lora_A)

    def eager_b(self, unit, h):
        return block_linear(h, unit.lora_B, self.nblocks) if self.side == "B" else F.linear(h, unit.lora_B)

    def emit(self, bb):
        x = bb.activation()
        a, b = bb.tensor("lora_A"), bb.tensor("lora_B")
        if self.side == "A":
            h = bb.new("call_function", block_linear, (x, a, self.nblocks), "lora_a")
            d = bb.new("call_function", F.linear, (h, b), "lora_b")
        else:
            h = bb.new("call_function", F.linear, (x, a), "lora_a")
            d = bb.new("call_function", block_linear, (h, b, self.nblocks), "lora_b")
        scaled = bb.new("call_function", operator.mul, (d, bb.unit.scaling), "lora_scaled")
        return bb.new("call_function", operator.add, (bb.y, scaled), "lora")
