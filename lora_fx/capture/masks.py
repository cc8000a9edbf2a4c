"""Attention-mask elision: a mask the captured graph builds from input sizes alone, and which is causal (or all
true), is dropped in favour of ``is_causal=True`` (or no mask), as Hugging Face's eager path does.

Under tracing, transformers always materialises the attention mask (``[B, 1, T, T]`` booleans) because it
cannot prove at trace time that there is no padding; scaled-dot-product attention then converts it to a float
mask in every layer and keeps it for backward. When the model is captured without an ``attention_mask`` input,
the mask depends on nothing but sizes. This pass proves that (every graph input reaches the mask only through
``sym_size``), evaluates the mask's subgraph at several sizes, and when it is lower-triangular (or all true)
at each, rewrites the attention calls to ``is_causal=True`` (or no mask) and removes the mask and the block
inputs that carried it.

Example::

    n = elide_masks(gm, templates, blocks)   # attention calls rewritten
"""

from __future__ import annotations

import torch
from torch import fx

from .blocks import Program, Template

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SYM_SIZE = torch.ops.aten.sym_size.int


def elide_masks(gm: fx.GraphModule, templates: dict[str, Template], blocks: dict) -> int:
    """Rewrite every attention call whose mask is provably causal or all true; returns how many graphs changed."""
    verdicts: dict[fx.Node, str | None] = {}

    def verdict(mask: fx.Node) -> str | None:
        if mask not in verdicts:
            verdicts[mask] = _classify(gm, mask)
        return verdicts[mask]

    changed = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=SDPA)):
        mask = _mask_arg(node)
        if isinstance(mask, fx.Node) and verdict(mask):
            _rewrite(node, verdict(mask))
            changed += 1
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in blocks]
    for t in templates.values():
        placeholders = [n for n in t.graph.nodes if n.op == "placeholder"]
        sites = [n for n in calls if n.target in t.members]
        for node in list(t.graph.find_nodes(op="call_function", target=SDPA)):
            mask = _mask_arg(node)
            if not isinstance(mask, fx.Node) or mask.op != "placeholder":
                continue
            k = placeholders.index(mask)
            kinds = {verdict(site.args[k]) if isinstance(site.args[k], fx.Node) else None for site in sites}
            if len(kinds) == 1 and (kind := kinds.pop()):
                _rewrite(node, kind)
        unused = [k for k, p in enumerate(placeholders) if not p.users and p.meta.get("val") is not None
                  and isinstance(p.meta["val"], torch.Tensor) and p.meta["val"].dtype == torch.bool]
        if unused:
            for site in sites:
                site.args = tuple(a for k, a in enumerate(site.args) if k not in unused)
            for k in unused:
                t.graph.erase_node(placeholders[k])
            t.graph.lint()
            program = Program(t.graph)
            for path in t.members:
                blocks[path].set_program(program)
            changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def _mask_arg(node: fx.Node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _rewrite(node: fx.Node, kind: str) -> None:
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    node.args = (*node.args[:3], None, dropout, kind == "causal")
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")}


def _classify(gm: fx.GraphModule, mask: fx.Node) -> str | None:
    """"causal", "full" or None: the mask's value at several input sizes, if it depends on sizes alone."""
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or val.dim() != 4:
        return None
    ancestors = _ancestors(mask)
    inputs = [n for n in ancestors if n.op == "placeholder"]
    if any(u in ancestors and u.target is not SYM_SIZE for p in inputs for u in p.users):
        return None  # the mask reads an input's values (a padding mask): keep it
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in ancestors or n is mask:
            env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[mask])
    fn = fx.GraphModule(gm, sub)
    found = set()
    for sizes in _size_assignments(inputs):
        try:
            with torch.no_grad():
                out = fn(*[torch.zeros(shape, dtype=p.meta["val"].dtype) for p, shape in zip(inputs, sizes)])
        except Exception:
            return None
        q, k = out.shape[-2:]
        if out.dtype != torch.bool or q != k:
            return None
        if bool(out.all()):
            found.add("full")
        elif torch.equal(out, torch.ones(q, k, dtype=torch.bool).tril().expand(out.shape)):
            found.add("causal")
        else:
            return None
    return found.pop() if len(found) == 1 else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _size_assignments(inputs: list[fx.Node]):
    """Concrete shapes for the inputs at a few values of their symbolic sizes (each symbol its own value)."""
    symbols = sorted({str(s) for p in inputs for s in p.meta["val"].shape if not isinstance(s, int)})
    for base in (3, 7, 12):
        values = {s: base + i for i, s in enumerate(symbols)}
        yield [tuple(s if isinstance(s, int) else values[str(s)] for s in p.meta["val"].shape) for p in inputs]
