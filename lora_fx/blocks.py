"""Blocks: a model's repeated layers kept as submodules of the captured graph module.

A block (``model.layers.3``) is a ``Block`` module that holds that layer's own parameters (the model's Parameter
objects, at paths relative to the block) and runs a ``Program``: its template graph, rewritten for the adapters
it carries and turned into Python once. Blocks whose rewrites are the same share one Program, so rebuilding
after ``set_adapter`` / ``merge`` rewrites one graph per group, not one per layer, and a compiled block's code is
reused by every block of its group. The outer graph calls each block as ``call_module``, passing the adapter
tensors the block reads as extra inputs::

    outer graph:  h = self.model.layers.3(h, mask, cos, sin, pos, <lora_A of layers.3.q_proj>, ...)
    block program (shared by layers 0..N-1):
        def forward(self, hidden_states, ..., default__self_attn_q_proj__lora_A, ...): ...

Example::

    block = lm.graph_module.get_submodule("model.layers.0")
    print(block.code)                      # the rewritten block graph, LoRA branches included
"""

from __future__ import annotations

import itertools
import linecache
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from .targets import Target, Unsupported

_COUNTER = itertools.count()


class Program:
    """A graph turned into Python once: ``fn(block, *inputs)``, shared by every block that runs it."""

    def __init__(self, graph: fx.Graph, label: str = "block") -> None:
        self.graph = graph
        code = graph.python_code(root_module="self")
        self.code: str = code.src
        filename = f"<lora_fx {label} program {next(_COUNTER)}>"
        linecache.cache[filename] = (len(self.code), None, self.code.splitlines(True), filename)  # tracebacks
        namespace = dict(code.globals)
        exec(compile(self.code, filename, "exec"), namespace)  # noqa: S102 (fx's own code generation)
        self.fn: Callable[..., Any] = namespace["forward"]
        self._compiled: dict[str, Callable[..., Any]] = {}

    def runner(self, compile_options: dict[str, Any] | None) -> Callable[..., Any]:
        """The plain function, or one ``torch.compile`` of it per set of options (shared by the group)."""
        if compile_options is None:
            return self.fn
        key = repr(sorted(compile_options.items()))
        if key not in self._compiled:
            self._compiled[key] = torch.compile(self.fn, **compile_options)
        return self._compiled[key]


class Block(nn.Module):
    """One repeated block of a captured model. Call it with the block call's inputs (then the adapter tensors
    its program reads); ``checkpointing`` recomputes it in backward (non-reentrant ``torch.utils.checkpoint``)."""

    def __init__(self, path: str, template: str) -> None:
        super().__init__()
        self.block_path, self.template = path, template
        self.program: Program | None = None
        self.checkpointing = False
        self.compile_options: dict[str, Any] | None = None
        self._run: Callable[..., Any] | None = None

    def set_program(self, program: Program) -> None:
        self.program = program
        self._run = program.runner(self.compile_options)

    def set_compile(self, options: dict[str, Any] | None) -> None:
        self.compile_options = options
        if self.program is not None:
            self._run = self.program.runner(options)

    def forward(self, *inputs: Any) -> Any:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run, self, *inputs, use_reentrant=False)
        return self._run(self, *inputs)

    @property
    def code(self) -> str:
        return self.program.code

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    def extra_repr(self) -> str:
        return f"template={self.template!r}" + (", checkpointing" if self.checkpointing else "")


@dataclass
class Template:
    """The pristine graph of a group of identical blocks, traced once. Placeholders are the block call's inputs;
    keys of ``targets`` are relative to the block."""

    id: str  # the path of the member it was traced from
    graph: fx.Graph
    module: nn.Module  # the module the graph was traced from (constants, guard functions)
    members: list[str]
    targets: list[Target | Unsupported] = field(default_factory=list)


def code_of(module: nn.Module) -> str:
    """A graph module's code, then the code of each distinct program its blocks run."""
    parts, seen = [module.code], set()
    for path, block in module.named_modules():
        if isinstance(block, Block) and block.program is not None and id(block.program) not in seen:
            seen.add(id(block.program))
            parts.append(f"# block program of {path} (and the blocks that share it)\n{block.code}")
    return "\n".join(parts)


def bind_block(block: Block, member: nn.Module, template: Template) -> None:
    """Give ``block`` the attributes its template graph reads: the member's own parameters, buffers and
    submodules where the member has them, else the template module's (lifted constants, guard functions)."""
    for node in template.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        source = member if _has_attr(member, node.target) else template.module
        _copy_attr(source, block, node.target)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """``root.<path> = module``, creating empty container modules on the way."""
    owner = root
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(owner, name):
            owner.add_module(name, nn.Module())
        owner = getattr(owner, name)
    owner.add_module(leaf, module)


def _has_attr(module: nn.Module, path: str) -> bool:
    try:
        for name in path.split("."):
            module = getattr(module, name)
    except AttributeError:
        return False
    return True


def _copy_attr(source: nn.Module, target: nn.Module, path: str) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        source = getattr(source, name)
        if not hasattr(target, name):
            target.add_module(name, nn.Module())
        target = getattr(target, name)
    value = getattr(source, leaf)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        persistent = leaf not in getattr(source, "_non_persistent_buffers_set", ())
        target.register_buffer(leaf, value, persistent=persistent)
    else:
        setattr(target, leaf, value)
