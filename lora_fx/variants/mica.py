"""MiCA (Minor Component Adaptation, PEFT's ``init_lora_weights="mica"``): B is the r left singular vectors of W with
the smallest singular values and stays frozen, A starts at zero and is what trains::

    W = U S Vᵀ (S descending),  B = U[:, -r:],  A = 0,   y' = y + s · B A dropout(x)

Forward, merge and PEFT's tensor names are plain LoRA's; only A trains (``frozen``). Linear targets, with r at most
``min(in, out)``. Not routable or combinable (its frozen B would train in a bank's stacked tensors).

Example::

    lm = lora_fx.lorafy(model, Rule("q_proj", r=8, init="mica"), example_inputs=(ids,))
"""

from __future__ import annotations

import torch

from ..errors import RuleError
from .base import Variant


class MiCA(Variant):
    name = "mica"
    label = "MiCA"
    routable = combinable = False
    frozen = ("lora_B",)

    def check(self, key, kind, geometry, r):
        self.refuse_rows(key, geometry)
        quant = getattr(geometry, "quant", "")
        if kind.name != "linear" or quant or getattr(geometry, "left", False):
            raise RuleError(f"init='mica' on {key!r}: MiCA takes B from the SVD of a full-precision linear weight "
                            f"(this is a {kind.name}{' with a quantized base' if quant else ''}); use init='default' "
                            "for it.")
        if r > min(geometry.in_features, geometry.out_features):
            raise RuleError(f"init='mica' on {key!r} needs r <= min(in, out) = "
                            f"{min(geometry.in_features, geometry.out_features)}, got r={r}.")

    @torch.no_grad()
    def init(self, unit, weight):
        w = weight.detach().to(torch.float32)
        w = w.T if unit.geometry.transposed else w  # [out, in], as PEFT transposes a fan_in_fan_out weight
        u, _, _ = torch.linalg.svd(w, full_matrices=False)
        unit.lora_B.copy_(u[:, -unit.r:])
        unit.lora_A.zero_()


MICA = MiCA()
