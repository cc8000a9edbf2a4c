"""Graph passes: plain functions on a fresh copy of a captured graph (see ``derive``)."""

from .derive import Rewrite, derive

__all__ = ["Rewrite", "derive"]
