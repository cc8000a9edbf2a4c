"""Capture with templates: trace each group of identical blocks once, inside one export of the whole model.

During the export every block call goes through a wrapper. The first call of each group (its template) runs
the block's own code between marker ops (``lora_fx::mark_in`` on each tensor input, ``lora_fx::mark_out`` on each
tensor output); every later call of the group becomes one opaque op, ``lora_fx::block_call``, whose fake result
copies the template call's output metadata, so the trace no longer grows with depth. After the export the region
between a template's markers is cut out into the template graph (``outline``), and every call becomes a
``call_module`` of its ``Block``. The result must reproduce the model's eager output on the example inputs, else
``TemplateMismatch`` is raised and the caller exports the model in one piece.

Example::

    outer, templates, blocks = capture_templated(model, (ids,), {})
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .blocks import Template, install_blocks
from .disk import CacheEntry
from .exporting import export_program, no_kv_cache
from .outline import MARK_IN, MARK_OUT, OutlineError, outline
from .repeats import repeated_blocks

_LIB = torch.library.Library("lora_fx", "FRAGMENT")
_LIB.define("block_call(Tensor[] inputs, int call) -> Tensor[]")
_OP = torch.ops.lora_fx.block_call.default


def _never_run(inputs, call):
    raise RuntimeError("lora_fx::block_call only marks a block during capture; it is never executed.")


_LIB.impl("block_call", _never_run, "CompositeExplicitAutograd")


class TemplateMismatch(Exception):
    """Templates cannot stand for this model's blocks (the caller falls back to a whole-model export)."""


@dataclass
class _Group:
    """A group of identical blocks and its template call, recorded while the export traces it."""

    members: list[str]
    leader: str | None = None  # the member whose first call is traced: the template
    call: int = -1
    in_spec: Any = None
    constants: list = field(default_factory=list)  # the flat inputs, tensors replaced by None
    tensor_at: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # names of the tensor inputs, for the template's placeholders
    inputs: list = field(default_factory=list)  # the template call's tensor inputs (fake, symbolic sizes)
    out_spec: Any = None
    out_constants: list = field(default_factory=list)
    out_tensor_at: list[int] = field(default_factory=list)
    out_sizes: list = field(default_factory=list)  # (shape, stride, dtype, device) of the template call's outputs


_CALLS: dict[int, tuple[_Group, str]] = {}  # call id -> (group, block path), alive during one capture


def capture_templated(model: nn.Module, args: tuple, kwargs: dict[str, Any], entry: CacheEntry | None = None,
                      read: bool = True):
    """(outer GraphModule, templates by id, blocks by path); raises TemplateMismatch when templates do not fit.
    With a capture cache ``entry`` a stored program replaces the export (``read``), and a fresh one is stored."""
    saved = [(b, b.clone()) for b in model.buffers()]  # a training run updates running statistics: put back
    hit = None
    try:
        with no_kv_cache(model, kwargs):
            with seeded(model):  # dropout in training mode: the check below replays the same masks
                groups, reference = _groups_and_reference(model, args, kwargs)
            _refuse_shared_parameters(model, groups)
            _restore(saved)
            hit = _stored(entry, model, groups, args, kwargs) if read else None
            program, calls = hit or _export_with_wrappers(model, args, kwargs, groups)
        gm = program.module()
        templates, blocks = _install(gm, model, groups, calls)
        with seeded(model):
            _check_reproduces(gm, args, kwargs, reference)
    except TemplateMismatch:
        if not hit:
            raise
        entry.drop()  # a stored program that no longer fits: capture afresh
        return capture_templated(model, args, kwargs, entry, read=False)
    finally:
        _restore(saved)
    if entry is not None and not hit:
        entry.store(program, model=model, state={"groups": [[g.members, g.leader, g.call, g.names] for g in groups],
                              "calls": [[call, path] for call, path in calls.items()]})
    return gm, templates, blocks


def _stored(entry: CacheEntry | None, model: nn.Module, groups: list[_Group], args: tuple, kwargs: dict):
    """(program, calls) from the capture cache, with each group's template call as recorded; None on a miss."""
    found = entry.load(model, args, kwargs) if entry is not None else None
    if found is None:
        return None
    program, state = found
    if [g.members for g in groups] != [members for members, *_ in state["groups"]]:
        entry.drop()
        return None
    for g, (_, leader, call, names) in zip(groups, state["groups"]):
        g.leader, g.call, g.names = leader, call, names
    return program, {call: path for call, path in state["calls"]}


@contextlib.contextmanager
def seeded(model: nn.Module) -> Any:
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def _restore(saved: list) -> None:
    with torch.no_grad():
        for b, value in saved:
            b.copy_(value)


def _groups_and_reference(model, args, kwargs) -> tuple[list[_Group], Any]:
    """The block groups the eager run calls (sibling groups, and any other module called more than once: a layer
    applied at several depths), and the eager output."""
    siblings = repeated_blocks(model)
    in_group = {p for g in siblings for p in g}
    calls: Counter = Counter()
    handles = []
    for path, module in model.named_modules():
        if path and any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(lambda m, a, path=path: calls.update([path])))
    try:
        with torch.no_grad():
            reference = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = [_Group([p for p in g if calls[p]]) for g in siblings]
    shared = [p for p, n in calls.items() if n > 1 and p not in in_group
              and not any(p.startswith(q + ".") or q.startswith(p + ".") for q in in_group)]
    shared = [p for p in shared if not any(p.startswith(q + ".") for q in shared)]  # outermost only
    groups = [g for g in groups if g.members] + [_Group([p]) for p in shared]
    if not groups:
        raise TemplateMismatch("no repeated blocks")
    return groups, reference


def _refuse_shared_parameters(model: nn.Module, groups: list[_Group]) -> None:
    """Blocks whose members share parameters (PEFT's layer replication) cannot be templated: torch.export names a
    shared parameter once, after one of its owners, so a template would misname the other's targets."""
    owner: dict[int, str] = {}
    for g in groups:
        for path in g.members:
            for p in model.get_submodule(path).parameters():
                if owner.setdefault(id(p), path) != path:
                    raise TemplateMismatch(f"blocks {owner[id(p)]!r} and {path!r} share parameters")


def _export_with_wrappers(model, args, kwargs, groups):
    wrapped = []
    for g in groups:
        for path in g.members:
            module = model.get_submodule(path)
            wrapped.append((module, module.__dict__.get("forward")))
            module.forward = _wrapper(module, path, g)  # an instance attribute shadows the class's forward
    try:
        program = export_program(model, args, kwargs)
        return program, {call: path for call, (_, path) in _CALLS.items()}
    except Exception as e:
        raise TemplateMismatch(f"the model cannot be exported with block templates: {e}") from e
    finally:
        for module, own in wrapped:
            del module.forward
            if own is not None:
                module.forward = own
        _CALLS.clear()


def _wrapper(module: nn.Module, path: str, g: _Group):
    original = module.__dict__.get("forward") or type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        call = len(_CALLS)
        _CALLS[call] = (g, path)
        if g.leader is None:
            return _trace_template(g, path, call, original, flat, spec, args, kwargs)
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        if spec != g.in_spec or [_meta(t) for t in tensors] != [_meta(t) for t in g.inputs] or any(
                (i in g.tensor_at) != isinstance(v, torch.Tensor) or (i not in g.tensor_at and not _same(v, c))
                for i, (v, c) in enumerate(zip(flat, g.constants))):
            raise TemplateMismatch(f"block {path} is called with other arguments than {g.leader}")
        return _outputs(g, _OP(tensors, call))
    return forward


def _trace_template(g: _Group, path: str, call: int, original, flat, spec, args, kwargs):
    """The group's first call: the block's own code, between markers."""
    g.leader, g.call, g.in_spec = path, call, spec
    g.tensor_at = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    g.constants = [None if isinstance(v, torch.Tensor) else v for v in flat]
    g.inputs = [flat[i] for i in g.tensor_at]
    params = list(inspect.signature(original).parameters)
    leaves_with_path = pytree.tree_flatten_with_path((args, kwargs))[0]
    g.names = [_leaf_name(p, params) for p, v in leaves_with_path if isinstance(v, torch.Tensor)]
    leaves = list(flat)
    for k, i in enumerate(g.tensor_at):
        leaves[i] = MARK_IN(flat[i], call, k)
    a, kw = pytree.tree_unflatten(leaves, spec)
    out_flat, g.out_spec = pytree.tree_flatten(original(*a, **kw))
    g.out_tensor_at = [i for i, v in enumerate(out_flat) if isinstance(v, torch.Tensor)]
    g.out_constants = [None if isinstance(v, torch.Tensor) else v for v in out_flat]
    outs = [out_flat[i] for i in g.out_tensor_at]
    g.out_sizes = [(tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in outs]
    return _outputs(g, [MARK_OUT(out_flat[i], call, k) for k, i in enumerate(g.out_tensor_at)])


def _outputs(g: _Group, tensors) -> Any:
    leaves = list(g.out_constants)
    for i, t in zip(g.out_tensor_at, tensors):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, g.out_spec)


def _meta(t: torch.Tensor) -> tuple:
    """dtype, device, and sizes and strides as symbolic expressions (read now: guards found since the template
    call may have made a symbol a constant)."""
    return t.dtype, t.device, tuple(map(str, t.shape)), tuple(map(str, t.stride()))


def _leaf_name(path, params: list[str]) -> str:
    """``hidden_states``, ``position_embeddings_0``, ...: the forward parameter a tensor input comes from."""
    keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path[1:]]
    if path[0].idx == 0 and keys and keys[0] < len(params):  # a positional argument: its parameter's name
        keys[0] = params[keys[0]]
    return "_".join(map(str, keys)) or "input"


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


@torch.library.register_fake("lora_fx::block_call")
def _block_call_fake(inputs, call):
    """The template call's output metadata: this call's inputs have the template call's (same symbols), so the
    outputs do too."""
    g, _ = _CALLS[call]
    return [torch.empty_strided(shape, stride, dtype=dtype, device=device)
            for shape, stride, dtype, device in g.out_sizes]


def _install(gm: fx.GraphModule, model: nn.Module, groups: list[_Group], calls: dict[int, str]):
    """Cut each template out of the exported graph, and make every block call a ``call_module`` of its Block."""
    templates: dict[str, Template] = {}
    for g in groups:
        if g.leader is None:
            continue  # called eagerly but not under export: not a block of this graph
        try:
            graph = outline(gm.graph, g.call, g.leader, g.names)
        except OutlineError as e:
            raise TemplateMismatch(str(e)) from e
        templates[g.leader] = Template(g.leader, graph, gm, [m for m in g.members if m in calls.values()])
    if not templates:
        raise TemplateMismatch("no block was called under export")
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _OP:
            with graph.inserting_before(node):
                new = graph.call_module(calls[node.args[1]], tuple(node.args[0]))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    try:
        blocks = install_blocks(gm, model, templates)
    except AttributeError as e:  # an attribute the template reads that neither the layer nor the template holds
        raise TemplateMismatch(f"a block's graph reads an attribute its layer lacks ({e})") from None
    for node in list(graph.nodes):  # a buffer the forward never reads (eval BatchNorm's num_batches_tracked)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return templates, blocks


def reproduces(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether ``gm`` gives ``model``'s eager outputs on the example inputs (buffers put back after both runs)."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        with no_kv_cache(model, kwargs), seeded(model), torch.no_grad():
            reference = model(*args, **kwargs)
        _restore(saved)
        with seeded(model):
            _check_reproduces(gm, args, kwargs, reference)
        return True
    except Exception:
        return False
    finally:
        _restore(saved)


def _check_reproduces(gm, args, kwargs, reference) -> None:
    try:
        with torch.no_grad():
            out = gm(*args, **kwargs)
    except Exception as e:
        raise TemplateMismatch(f"the templated graph does not run: {e}") from e
    ours, theirs = pytree.tree_leaves(out), pytree.tree_leaves(reference)
    if len(ours) != len(theirs) or not all(
            (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
             and torch.allclose(a, b, rtol=1e-4, atol=1e-5)) or (not isinstance(a, torch.Tensor) and _same(a, b))
            for a, b in zip(ours, theirs)):
        raise TemplateMismatch("the templated graph does not reproduce the model's output on the example inputs")
