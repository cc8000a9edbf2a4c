"""PEFT's ``layer_replication``: stack a model's decoder layers again, the copies sharing the base weights, so
each copy gets its own adapter (as PEFT's ``replicate_layers``; done to the model before it is captured).

The map ``[[0, 4], [2, 5]]`` turns layers ``[0, 1, 2, 3, 4]`` into ``[0, 1, 2, 3, 2, 3, 4]``: each new layer is a
copy of the original whose parameters are the original's own (buffers are copied), and whose ``layer_idx``
(transformers' KV cache slot) is its new position.

Example::

    replicate_layers(model, ((0, 4), (2, 5)))     # model.model.layers: 7 layers; config.num_hidden_layers == 7
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from torch import nn

from ..errors import RuleError


def layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layers and the attribute name, found as PEFT finds them
    (``model(.model)*.layers``, a BERT encoder's ``layer``, Falcon's ``h``)."""
    while hasattr(model, "model") and isinstance(model.model, nn.Module):
        model = model.model
    if isinstance(getattr(model, "bert", None), nn.Module):
        model = model.bert
    for owner, attr in ((model, "layers"), (getattr(model, "encoder", None), "layer"), (model, "h")):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise RuleError(f"layer_replication: {type(model).__name__} has no layer list PEFT would find (model.layers, "
                    "encoder.layer or h as an nn.ModuleList); replicate its layers yourself before lorafy.")


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> Callable[[], None]:
    """Replicate in place; returns a function putting the original layers (and layer count) back."""
    owner, attr = layer_list(model)
    layers = getattr(owner, attr)
    spans = [tuple(int(v) for v in span) for span in layer_map]
    bad = [s for s in spans if len(s) != 2 or not 0 <= s[0] < s[1] <= len(layers)]
    if bad or not spans:
        raise RuleError(f"layer_replication={[list(s) for s in spans]}: each entry is [start, end) within the "
                        f"model's {len(layers)} layers{'; bad: ' + str(bad) if bad else ''}.")
    new = []
    for start, end in spans:
        for i in range(start, end):
            clone = _shared_copy(layers[i])
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    setattr(owner, attr, nn.ModuleList(new))
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is not None:
        config.num_hidden_layers = len(new)

    def undo() -> None:
        setattr(owner, attr, layers)
        if count is not None:
            config.num_hidden_layers = count
    return undo


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)
