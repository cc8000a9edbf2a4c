"""Deployment: compile with good defaults and export to a ``.pt2`` program (``compile``), and merged model
directories (``merge_dir``, the ``lora-fx merge`` command)."""

from .compile import compile, export  # noqa: A004

__all__ = ["compile", "export"]
