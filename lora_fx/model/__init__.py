"""The LoraModel (``core``): its state (``state``), the planners of its verbs (``verbs``, ``checkpoints``,
``swap``, ``combine``), transactions and the lock that serialises them (``transaction``), the cache of derived
graphs (``graphs``), calls (``calls``) and introspection (``report``)."""

from .core import LoraModel
from .state import LoraState, Options

__all__ = ["LoraModel", "LoraState", "Options"]
