"""The built-in recognisers: linear, embedding and convolution in every graph form.

Each is registered with ``@recogniser`` and returns a Target, an Unsupported (a known layer kind that
cannot be adapted, with the reason) or None. Adding an op form is one more function here.

Example::

    @recogniser
    def my_linear(ctx, node): ...   # -> Target(key, LINEAR, LinearGeometry(in, out), node.name, at, weight, op)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .kinds import CONV, EMBEDDING, LINEAR, BiasRef, ConvGeometry, EmbeddingGeometry, LinearGeometry
from .targets import Context, Target, Unsupported, arg, recogniser

aten = torch.ops.aten


def _module_bias(m: nn.Module, path: str) -> BiasRef | None:
    """Where a module's bias lives, for ops (DoRA, merging lora_B's bias) that need it."""
    return BiasRef(attr=f"{path}.bias") if getattr(m, "bias", None) is not None else None


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


# ---- linear ------------------------------------------------------------------------------------------

@recogniser
def linear_module(ctx: Context, node: fx.Node) -> Target | None:
    """``call_module`` on nn.Linear (W [out, in]) or transformers' Conv1D (W [in, out])."""
    if node.op != "call_module":
        return None
    m = ctx.module(node.target)
    if isinstance(m, nn.Linear):
        transposed, op = False, "Linear"
        out_f, in_f = m.weight.shape
    elif m is not None and _is_hf_conv1d(m):
        transposed, op = True, "Conv1D"
        in_f, out_f = m.weight.shape
    else:
        return None
    geometry = LinearGeometry(in_f, out_f, transposed, _module_bias(m, node.target))
    return Target(node.target, LINEAR, geometry, node.name, (0, "input"), f"{node.target}.weight", op)


_LINEAR_FNS = {F.linear: "F.linear", aten.linear.default: "aten.linear"}
_MATMUL_FNS = {
    torch.matmul: "torch.matmul", operator.matmul: "matmul", torch.mm: "torch.mm",
    aten.mm.default: "aten.mm", aten.matmul.default: "aten.matmul",
}
_ADDMM_FNS = {torch.addmm: "torch.addmm", aten.addmm.default: "aten.addmm"}


@recogniser
def linear_function(ctx: Context, node: fx.Node) -> Target | None:
    """``F.linear``/``aten.linear`` (W [out, in]); ``mm``/``matmul``/``addmm`` with a 2-D parameter
    as the right operand (W [in, out])."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR_FNS:
        at, w, transposed, bias = (0, "input"), arg(node, 1, "weight"), False, BiasRef(at=(2, "bias"))
    elif node.target in _MATMUL_FNS:
        at, w, transposed, bias = (0, "input"), arg(node, 1, "other"), True, None
    elif node.target in _ADDMM_FNS:
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
            return None
        at, w, transposed, bias = (1, "mat1"), arg(node, 2, "mat2"), True, BiasRef(at=(0, "input"))
    else:
        return None
    found = ctx.param_of(w)
    if found is None or found[1].dim() != 2 or not isinstance(arg(node, *at), fx.Node):
        return None
    path, p = found
    out_f, in_f = p.shape[::-1] if transposed else p.shape
    op = {**_LINEAR_FNS, **_MATMUL_FNS, **_ADDMM_FNS}[node.target]
    return Target(ctx.key_for(node, path, p), LINEAR, LinearGeometry(in_f, out_f, transposed, bias), node.name,
                  at, path, op)


# ---- embedding ---------------------------------------------------------------------------------------

def _embedding_target(ctx: Context, node: fx.Node, key: str, at, path: str, weight, op: str, settings: dict):
    if settings.get("max_norm") is not None:
        return Unsupported(key, "embedding", node.name, "max_norm renormalises the embedding weight in place during "
                                                        "the forward, which LoRA's separate tables cannot follow")
    num, dim = weight.shape
    return Target(key, EMBEDDING, EmbeddingGeometry(num, dim, settings.get("padding_idx")), node.name, at, path, op)


@recogniser
def embedding_module(ctx: Context, node: fx.Node) -> Target | Unsupported | None:
    """``call_module`` on nn.Embedding (W [num_embeddings, dim]); nn.EmbeddingBag is refused."""
    if node.op != "call_module":
        return None
    m = ctx.module(node.target)
    if isinstance(m, nn.EmbeddingBag):
        return Unsupported(node.target, "embedding", node.name, "nn.EmbeddingBag reduces bags of rows; only "
                                                                "nn.Embedding lookups can be adapted")
    if not isinstance(m, nn.Embedding):
        return None
    return _embedding_target(ctx, node, node.target, (0, "input"), f"{node.target}.weight", m.weight,
                             "Embedding", {"padding_idx": m.padding_idx, "max_norm": m.max_norm})


@recogniser
def embedding_function(ctx: Context, node: fx.Node) -> Target | Unsupported | None:
    """``F.embedding(idx, W, padding_idx, max_norm, ...)`` and ``aten.embedding(W, idx, padding_idx)``."""
    if node.op != "call_function":
        return None
    if node.target is F.embedding:
        at, w = (0, "input"), arg(node, 1, "weight")
        settings = {"padding_idx": arg(node, 2, "padding_idx"), "max_norm": arg(node, 3, "max_norm")}
        op = "F.embedding"
    elif node.target is aten.embedding.default:
        w, at = arg(node, 0, "weight"), (1, "indices")
        pad = arg(node, 2, "padding_idx", -1)
        settings, op = {"padding_idx": None if pad == -1 else pad}, "aten.embedding"
    else:
        return None
    found = ctx.param_of(w)
    if found is None or found[1].dim() != 2:
        return None
    path, p = found
    return _embedding_target(ctx, node, ctx.key_for(node, path, p), at, path, p, op, settings)


# ---- convolution -------------------------------------------------------------------------------------

_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
             aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_TRANSPOSED_FNS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _conv_target(node, key, at, path, weight, op, dims, stride, padding, dilation, groups, pad=None, pad_mode=None,
                 bias=None):
    if groups != 1:
        return Unsupported(key, "conv", node.name, f"grouped/depthwise convolution (groups={groups}) is not "
                                                   "supported; LoRA's A and B convs are ungrouped")
    out_c, in_c = weight.shape[:2]
    geometry = ConvGeometry(dims, in_c, out_c, tuple(weight.shape[2:]), stride, padding, dilation, pad, pad_mode,
                            bias)
    return Target(key, CONV, geometry, node.name, at, path, op)


@recogniser
def conv_module(ctx: Context, node: fx.Node) -> Target | Unsupported | None:
    """``call_module`` on nn.Conv1d/2d/3d, with stride, padding, dilation and any padding mode."""
    if node.op != "call_module":
        return None
    m = ctx.module(node.target)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return Unsupported(node.target, "conv", node.name, "transposed convolutions are not supported")
    dims = _CONV_MODULES.get(type(m))
    if dims is None:
        return None
    pad = pad_mode = None
    padding = m.padding
    if m.padding_mode != "zeros":  # the module pads explicitly, then convolves with no padding
        pad, pad_mode, padding = tuple(m._reversed_padding_repeated_twice), m.padding_mode, 0
    return _conv_target(node, node.target, (0, "input"), f"{node.target}.weight", m.weight,
                        type(m).__name__, dims, m.stride, padding, m.dilation, m.groups, pad, pad_mode,
                        _module_bias(m, node.target))


@recogniser
def conv_function(ctx: Context, node: fx.Node) -> Target | Unsupported | None:
    """``F.conv*d`` / ``aten.conv*d`` / ``aten.convolution`` with a parameter weight."""
    if node.op != "call_function":
        return None
    if node.target in _CONV_FNS:
        dims = _CONV_FNS[node.target]
        transposed = False
        stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
        dilation, groups = arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1)
        op = "aten." + node.target.__name__.split(".")[0] if node.target in (
            aten.conv1d.default, aten.conv2d.default, aten.conv3d.default) else f"F.conv{dims}d"
    elif node.target is aten.convolution.default:
        stride, padding, dilation = node.args[3], node.args[4], node.args[5]
        transposed, groups, op = node.args[6], node.args[8], "aten.convolution"
        dims = len(stride)
    elif node.target in _TRANSPOSED_FNS:
        dims, transposed, op = 0, True, node.target.__name__
    else:
        return None
    found = ctx.param_of(arg(node, 1, "weight"))
    if found is None:
        return None
    path, p = found
    key = ctx.key_for(node, path, p)
    if transposed:
        return Unsupported(key, "conv", node.name, "transposed convolutions are not supported")
    return _conv_target(node, key, (0, "input"), path, p, op, dims or p.dim() - 2, stride, padding,
                        dilation, groups, bias=BiasRef(at=(2, "bias")))
