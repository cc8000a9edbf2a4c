"""Deployment: compile with good defaults and export to a ``.pt2`` program (``compile``), and merged model
directories (``merge_dir``, the ``lora-fx merge`` command), and AOTInductor packages, merged or with swappable
adapters (``package``), and ``lm.generate``'s graph as a package (``generation``)."""

from ..generation.loop import PackagedGenerator
from .compile import compile, export  # noqa: A004
from .generation import package_generation
from .package import package, read_manifest, route, swap_adapter

__all__ = ["compile", "export", "package", "package_generation", "PackagedGenerator", "swap_adapter",
           "read_manifest", "route"]
