"""Casting a LoraModel: ``to`` / ``half`` / ``bfloat16`` / ``float`` / ``double`` as ``nn.Module`` has them, except that
a model captured by torch.export refuses a floating dtype other than its base weights' (its graph keeps the dtypes it
was captured with: casts, checks on buffers), before anything is cast.

Example::

    lm.to("cuda")              # fine
    lm.to(torch.bfloat16)      # AdapterError on an exported float32 model: lorafy(model.to(torch.bfloat16), ...)
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterError


def _dtype_of(args: tuple, kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype a ``Module.to(...)`` call asks for (a dtype argument, or a tensor's), else None."""
    for value in (*args, kwargs.get("dtype"), kwargs.get("tensor")):
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, torch.Tensor):
            return value.dtype
    return None


class DtypeMixin:
    def to(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.to``; a floating dtype other than the base weights' on a model captured by torch.export is
        refused (see ``_check_recast``)."""
        self._check_recast(_dtype_of(args, kwargs))
        return super().to(*args, **kwargs)

    def half(self) -> Any:
        self._check_recast(torch.float16)
        return super().half()

    def bfloat16(self) -> Any:
        self._check_recast(torch.bfloat16)
        return super().bfloat16()

    def float(self) -> Any:
        self._check_recast(torch.float32)
        return super().float()

    def double(self) -> Any:
        self._check_recast(torch.float64)
        return super().double()

    def _check_recast(self, dtype: torch.dtype | None) -> None:
        """torch.export fixes a graph's dtypes (its casts and its checks on buffers), so an exported model cast to
        another floating dtype would compute in a mix of both: refused before anything is cast."""
        cap = self._state.captured
        if dtype is None or not dtype.is_floating_point or cap.method != "export":
            return
        base = {p.dtype for p in cap.source.parameters() if p.is_floating_point()}
        if base and base != {dtype}:
            raise AdapterError(f"to({dtype}): this model was captured by torch.export in {sorted(map(str, base))}, "
                               "and an exported graph keeps the dtypes it was captured with. Cast the model before "
                               f"lorafy (lorafy(model.to({dtype}), ...)), or save_pretrained and from_peft the "
                               "adapter onto a model in that dtype. Nothing was cast.")
