"""Child names for the store's modules: a key as a unique Python identifier.

Example::

    child_name("model.layers.0.q", set(), nn.Module)     # "model_layers_0_q"
"""

from __future__ import annotations

import re


def child_name(key: str, taken: set[str], owner: type) -> str:
    """``key`` as a unique child name (``model.layers.0.q`` -> ``model_layers_0_q``)."""
    base = re.sub(r"\W", "_", key) or "unit"
    if base[0].isdigit() or hasattr(owner, base):
        base = "m_" + base
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
