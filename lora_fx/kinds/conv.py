"""Convolution targets: ``y = conv(x, W)`` with W ``[out, in / groups, *k]``, any stride, padding, dilation, padding
mode and groups.

LoRA branch (PEFT's layout): A a conv ``[r, in, *k]`` with the base stride, padding **and dilation**, B a 1x1
conv ``[out, r / groups, 1..]`` with the base's groups (PEFT's: ``r`` must be a multiple of ``groups``); a
non-zero padding mode pads the input first, as the base module does::

    delta = s · conv_B(conv_A(pad(x)))          ΔW = s · (B[:, :, 1..] @ A.flatten(1)).view(out, in, *k)

A grouped conv's update reads every input channel (A is not grouped), so it is no grouped weight: it cannot be
merged (PEFT refuses too), routed or combined; its "ΔW" is PEFT's DoRA ``lora_weight`` (B and A multiplied as
``[out / groups, r] @ [r, in·k]`` and laid out in W's shape), which DoRA normalises.

Example::

    CONV.shapes(ConvGeometry(2, 8, 4, (3, 3), 1, 1, 1), r=2)   # (2, 8, 3, 3), (4, 2, 1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from ..bank import routing
from ..errors import RuleError
from ..ops import dora
from .base import BiasRef, Kind

CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvGeometry:
    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: Any
    padding: Any
    dilation: Any
    pad: tuple[int, ...] | None = None  # explicit input padding for a non-zero padding mode
    pad_mode: str | None = None
    bias: BiasRef | None = None
    groups: int = 1

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels


class ConvKind(Kind):
    name = "conv"

    def shapes(self, geometry: ConvGeometry, r: int):
        return (r, geometry.in_channels, *geometry.kernel), (geometry.out_channels, r // geometry.groups,
                                                             *([1] * geometry.dims))

    def check(self, key, geometry, r):
        if r % geometry.groups:
            raise RuleError(f"r={r} on {key!r}: it is a convolution with groups={geometry.groups}, where LoRA's B is "
                            f"grouped too and r must be a multiple of {geometry.groups} (PEFT's rule); choose such an "
                            "r (rank_pattern for this key) or exclude it.")

    def refusal(self, geometry, operation):
        if geometry.groups > 1:
            return (f"a convolution with groups={geometry.groups}, whose LoRA update reads every input channel and "
                    f"so is no grouped weight: {operation} is not possible (PEFT cannot merge it either)")
        return None

    def delta(self, a, b, scaling, geometry):
        r = a.shape[0]
        if geometry.groups > 1:
            return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(geometry.out_channels,
                                                                 geometry.in_channels // geometry.groups,
                                                                 *geometry.kernel) * scaling
        return (b.flatten(1) @ a.flatten(1)).view(geometry.out_channels, geometry.in_channels,
                                                  *geometry.kernel) * scaling

    def oriented(self, weight, geometry):
        return weight.flatten(1)

    def norm(self, weight, geometry):
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(1, 0)

    def per_output(self, factor, geometry):
        return factor.transpose(1, 0)

    def padded(self, geometry: ConvGeometry, x, new):
        if geometry.pad_mode is None:
            return x
        return new("call_function", F.pad, (x, geometry.pad), "lora_pad", {"mode": geometry.pad_mode})

    def emit(self, g, geometry, x, a, b, b_bias, new):
        conv = CONV_FNS[geometry.dims]
        x = self.padded(geometry, x, new)
        h = new("call_function", conv, (x, a, None, geometry.stride, geometry.padding, geometry.dilation), "lora_a")
        if geometry.groups > 1:
            return new("call_function", conv, (h, b, b_bias, 1, 0, 1, geometry.groups), "lora_b")
        return new("call_function", conv, (h, b, b_bias), "lora_b")

    def emit_routed(self, g, geometry, x, y, bank, new):
        x = self.padded(geometry, x, new)
        args = (x, y, *bank, geometry.stride, geometry.padding, geometry.dilation)
        return new("call_function", routing.routed_conv, args, "lora_routed")

    def emit_dora(self, g, geometry, x, y, w, bias, params, scaling, dropout, new):
        x = self.padded(geometry, x, new)
        args = (x, y, w, bias, params["lora_A"], params["lora_B"], params["lora_magnitude_vector"], scaling,
                geometry.stride, geometry.padding, geometry.dilation, dropout, geometry.groups)
        return new("call_function", dora.dora_conv, args, "dora")


CONV = ConvKind()
