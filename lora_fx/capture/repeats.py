"""Find a model's repeated blocks: the units of templates, gradient checkpointing, FSDP2 sharding and regional
compilation.

Siblings (children of one module) form a block group when they have the same class, the same parameters,
buffers and submodules (names, shapes, dtypes, classes) and the same settings: every non-tensor attribute of
every submodule, except an integer that differs in every sibling (an index such as ``layer_idx``). Siblings
whose settings differ (say, sliding-window and full-attention layers) form groups of their own. Only the
outermost blocks are kept: nothing inside a block member is searched.

Example::

    repeated_blocks(llama)   # [["model.layers.0", "model.layers.1", ...]]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn


def repeated_blocks(model: nn.Module) -> list[list[str]]:
    """Groups of block paths, each group identical by the rules above, in model order."""
    groups: list[list[str]] = []
    _visit(model, "", groups)
    return groups


def _visit(module: nn.Module, prefix: str, groups: list[list[str]]) -> None:
    by_structure: dict[Any, list[tuple[str, nn.Module]]] = defaultdict(list)
    children = [(name, child) for name, child in module.named_children()]
    for name, child in children:
        if _has_inner_parameters(child):
            by_structure[_structure(child)].append((name, child))
    claimed: set[str] = set()
    for members in by_structure.values():
        if len(members) < 2:
            continue
        for group in _split_by_settings(members):
            groups.append([f"{prefix}{name}" for name, _ in group])
            claimed.update(name for name, _ in group)
    for name, child in children:
        if name not in claimed:
            _visit(child, f"{prefix}{name}.", groups)


def _has_inner_parameters(module: nn.Module) -> bool:
    """A block has submodules holding parameters (a lone nn.Linear is a target, not a block)."""
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _structure(module: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters(remove_duplicate=False))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers(remove_duplicate=False))
    mods = tuple((n, type(m)) for n, m in module.named_modules(remove_duplicate=False))
    return type(module), params, buffers, mods


def _split_by_settings(members: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    settings = [_settings(module) for _, module in members]
    names = set().union(*settings)
    index_like = {n for n in names if _is_index(n, settings)}
    groups: dict[tuple, list[tuple[str, nn.Module]]] = defaultdict(list)
    for member, s in zip(members, settings):
        groups[tuple(sorted((k, v) for k, v in s.items() if k not in index_like))].append(member)
    return list(groups.values())


def _is_index(name: tuple, settings: list[dict]) -> bool:
    values = [s.get(name) for s in settings]
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values) and len(set(values)) == len(values)


def _settings(block: nn.Module) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for path, module in block.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            if name.startswith("_") or name == "training":
                continue
            out[(path, name)] = _normalise(value)
    return out


def _normalise(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return ("object", id(value))
