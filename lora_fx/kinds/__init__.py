"""Target kinds: one strategy object per kind (``LINEAR``, ``EMBEDDING``, ``CONV``, ``PARAM``) and its typed geometry.
``KINDS`` is the registry rules validate ``kinds=`` against; a new kind is one more module here.

Example::

    from lora_fx.kinds import KINDS
    KINDS["conv"].shapes(geometry, r=4)
"""

from .base import BiasRef, Kind
from .conv import CONV, ConvGeometry
from .embedding import EMBEDDING, EmbeddingGeometry
from .linear import LINEAR, LinearGeometry
from .param import PARAM, ParamGeometry

KINDS: dict[str, Kind] = {k.name: k for k in (LINEAR, EMBEDDING, CONV, PARAM)}

__all__ = ["KINDS", "Kind", "BiasRef", "LINEAR", "EMBEDDING", "CONV", "LinearGeometry", "EmbeddingGeometry",
           "ConvGeometry", "PARAM", "ParamGeometry"]
