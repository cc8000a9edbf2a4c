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

from ..targets import Target, Unsupported

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
    its program reads); ``checkpointing`` recomputes it in backward (non-reentrant ``torch.utils.checkpoint``).

    A block holds one program per captured call signature of the model (``program=""``: the graph captured by
    ``lorafy``; others when the model is called with other keyword arguments), all over the same parameters."""

    def __init__(self, path: str, template: str) -> None:
        super().__init__()
        self.block_path, self.template = path, template
        self.programs: dict[str, Program] = {}
        self.checkpointing = False
        self.compile_options: dict[str, Any] | None = None
        self._runs: dict[str, Callable[..., Any]] = {}

    @property
    def program(self) -> Program | None:
        return self.programs.get("")

    def set_program(self, program: Program | None, key: str = "") -> None:
        """Run ``program`` for capture ``key`` (None: drop that capture's program)."""
        if program is None:
            self.programs.pop(key, None)
            self._runs.pop(key, None)
            return
        self.programs[key] = program
        self._runs[key] = program.runner(self.compile_options)

    def set_compile(self, options: dict[str, Any] | None) -> None:
        self.compile_options = options
        self._runs = {key: p.runner(options) for key, p in self.programs.items()}

    def forward(self, *inputs: Any, program: str = "") -> Any:
        run = self._runs[program]
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(run, self, *inputs, use_reentrant=False)
        return run(self, *inputs)

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
    """A graph module's code, then the code of each distinct program its blocks run for it."""
    parts, seen = [module.code], set()
    for path, block in module.named_modules():
        if isinstance(block, Block) and block.program is not None and id(block.program) not in seen:
            seen.add(id(block.program))
            parts.append(f"# block program of {path} (and the blocks that share it)\n{block.code}")
    return "\n".join(parts)


def adopt_blocks(gm: fx.GraphModule, graph: fx.Graph, blocks: dict[str, Block], templates: dict[str, Template],
                 owners: dict[str, Block], key: str, model: nn.Module, prefix: str = "") -> dict[str, Block]:
    """Make a later capture of the same model call the first capture's Block objects (``owners``), which then run
    its templates as programs ``key``: one set of blocks, so checkpointing, FSDP2 sharding and regional compilation
    set up on them cover every captured call signature. ``prefix``: where ``model`` (what was captured) sits in the
    first capture's model. Returns the blocks ``gm`` now calls."""
    adopted = {}
    for path, block in blocks.items():
        owner = owners.get(prefix + path)
        if owner is None:
            adopted[path] = block
            continue
        t = templates[block.template]
        bind_block(owner, model.get_submodule(path), t, keep=True)
        owner.set_program(block.programs[""], key)
        set_submodule(gm, path, owner)
        adopted[path] = owner
    for node in graph.nodes:
        if node.op == "call_module" and node.target in adopted and adopted[node.target] is owners.get(
                prefix + node.target):
            node.kwargs = {**node.kwargs, "program": key}
    return adopted


def bind_block(block: Block, member: nn.Module, template: Template, keep: bool = False) -> None:
    """Give ``block`` the attributes its template graph reads: the member's own parameters, buffers and
    submodules where the member has them, else the template module's (lifted constants, guard functions).
    ``keep``: attributes the block already has stay (they must be the same objects)."""
    for node in template.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        source = member if _has_attr(member, node.target) else template.module
        if keep and _has_attr(block, node.target):
            if _resolve(block, node.target) is not _resolve(source, node.target):
                raise ValueError(f"{block.block_path}.{node.target} differs between captures of the block")
            continue
        _copy_attr(source, block, node.target)


def install_blocks(gm: nn.Module, model: nn.Module, templates: dict[str, Template]) -> dict[str, Block]:
    """One ``Block`` per member of each template, bound to the model's layer and put at its path in ``gm``;
    the members of a template share one Program of its pristine graph."""
    blocks = {}
    for t in templates.values():
        program = Program(t.graph)
        for path in t.members:
            block = Block(path, t.id)
            bind_block(block, model.get_submodule(path), t)
            block.set_program(program)
            set_submodule(gm, path, block)
            blocks[path] = block
    return blocks


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
        _resolve(module, path)
    except AttributeError:
        return False
    return True


def _resolve(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


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
