"""Targets: the nodes LoRA can attach to, found by one recogniser per op form (``recognisers``, registered on
import) and described by a kind and its geometry (``core``).

Example::

    for t in find_targets(gm.graph, gm, model):
        print(t.key, t.kind, t.geometry)
"""

from . import experts, recognisers  # noqa: F401  (the built-in recognisers register themselves)
from .core import (
    RECOGNISERS,
    Context,
    Target,
    Unsupported,
    arg,
    base_weight,
    compute_dtype,
    find_targets,
    idle_modules,
    recogniser,
    weight_uses,
)

__all__ = ["RECOGNISERS", "Context", "Target", "Unsupported", "arg", "base_weight", "compute_dtype", "find_targets",
           "idle_modules", "recogniser", "weight_uses"]
