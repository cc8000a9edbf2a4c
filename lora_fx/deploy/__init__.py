"""Deployment: compile with good defaults and export to a ``.pt2`` program (``compile``), and merged model
directories (``merge_dir``, the ``lora-fx merge`` command), and AOTInductor packages, merged or with swappable
adapters (``package``)."""

from .compile import compile, export  # noqa: A004
from .package import package, read_manifest, route, swap_adapter

__all__ = ["compile", "export", "package", "swap_adapter", "read_manifest", "route"]
