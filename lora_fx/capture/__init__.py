"""Capture a model as a torch.fx GraphModule that shares the model's Parameter objects, with its repeated blocks
kept as ``Block`` submodules (``core``, ``blocks``), by ``symbolic_trace`` or ``torch.export`` (``exporting``,
``templated``), and further captures of it for other call signatures (``signatures``)."""

from .core import CAPTURE_LOCK, Captured, capture, distinct_inputs
from .exporting import export_program

__all__ = ["CAPTURE_LOCK", "Captured", "capture", "distinct_inputs", "export_program"]
