"""Graph passes: plain functions ``(gm, ...) -> records`` that end with DCE, lint and recompile."""

from .insert import insert_lora
from .remove import remove_lora

__all__ = ["insert_lora", "remove_lora"]
