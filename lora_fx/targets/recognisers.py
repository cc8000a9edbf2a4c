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

from ..kinds import CONV, EMBEDDING, LINEAR, BiasRef, ConvGeometry, EmbeddingGeometry, LinearGeometry
from ..ops.quantized import OPS as QUANT_OPS
from ..ops.quantized import QuantLinear
from .core import Context, Target, Unsupported, arg, recogniser
from .rows import row_slice_of

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
_T_FNS = (torch.t, aten.t.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default)
_SWAP_FNS = (torch.transpose, aten.transpose.int)
_PERMUTE_FNS = (torch.permute, aten.permute.default)


def _swaps_2d(dims) -> bool:
    """Whether ``dims`` (a transpose pair or a permutation) swaps the two axes of a 2-D tensor."""
    return all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]


def transposed_of(node) -> fx.Node | None:
    """The node ``node`` transposes when it is a 2-D transpose (``W.T``, ``W.mT``, ``W.t()``,
    ``W.transpose(0, 1)``, ``W.permute(1, 0)``, ``aten.t``/``numpy_T``/``transpose``/``permute``), else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, rest = node.args[0], tuple(node.args[1:])
    if node.op == "call_function" and node.target is getattr:
        return src if rest in (("T",), ("mT",)) else None
    if node.op == "call_method":
        swap = node.target in ("t", "adjoint") and not rest
        swap = swap or (node.target == "transpose" and len(rest) == 2 and _swaps_2d((rest[1], rest[0])))
        swap = swap or (node.target == "permute" and _swaps_2d(rest[0] if len(rest) == 1 else rest))
        return src if swap else None
    if node.op != "call_function":
        return None
    if node.target in _T_FNS:
        return src
    if node.target in _SWAP_FNS and len(rest) == 2 and _swaps_2d((rest[1], rest[0])):
        return src
    if node.target in _PERMUTE_FNS and rest and _swaps_2d(rest[0]):
        return src
    return None


def _weight_operand(ctx: Context, w) -> tuple[tuple[str, nn.Parameter], bool] | None:
    """((path, parameter), seen transposed) for a 2-D parameter used directly or through a transpose."""
    found = ctx.param_of(w)
    if found is not None:
        return (found, False) if found[1].dim() == 2 else None
    found = ctx.param_of(transposed_of(w))
    return ((found, True) if found is not None and found[1].dim() == 2 else None)


@recogniser
def linear_function(ctx: Context, node: fx.Node) -> Target | None:
    """``F.linear``/``aten.linear`` (W [out, in]); ``mm``/``matmul``/``addmm`` with a 2-D parameter as the right
    operand (``x @ W``: W [in, out]) or its transpose (``x @ W.T``, ``matmul(x, W.t())``: W [out, in]); and
    ``W @ x`` (``W @ x.T``: the output is ``[out, N]``, the branch computes ``B A x`` on the left)."""
    if node.op != "call_function":
        return None
    left = False
    if node.target in _LINEAR_FNS:
        at, w, transposed, bias = (0, "input"), arg(node, 1, "weight"), False, BiasRef(at=(2, "bias"))
        found = ctx.param_of(w)
        found = found if found is not None and found[1].dim() == 2 else None
        form = ""
        if found is None and (sliced := row_slice_of(ctx, w)) is not None:
            path, p, rows = sliced
            geometry = LinearGeometry(p.shape[1], p.shape[0], rows=rows)
            op = f"{_LINEAR_FNS[node.target]} (rows {rows[0]}:{rows[1]} of {path.rpartition('.')[2]})"
            return Target(ctx.key_for(node, path, p), LINEAR, geometry, node.name, at, path, op)
    elif node.target in _MATMUL_FNS or node.target in _ADDMM_FNS:
        at, w, bias = (0, "input"), arg(node, 1, "other"), None
        if node.target in _ADDMM_FNS:
            if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
                return None
            at, w, bias = (1, "mat1"), arg(node, 2, "mat2"), BiasRef(at=(0, "input"))
        seen = _weight_operand(ctx, w)
        left_seen = _weight_operand(ctx, arg(node, 0, "input")) if node.target in _MATMUL_FNS else None
        if seen is None and left_seen is not None:  # W @ x: the weight is the left operand
            seen, at, left = left_seen, (1, "other"), True
        if seen is None:
            return None
        found, flipped = seen
        transposed = flipped if left else not flipped
        form = (" (W.T @ x)" if flipped else " (W @ x)") if left else " (x @ W.T)" if flipped else ""
    else:
        return None
    if found is None or not isinstance(arg(node, *at), fx.Node):
        return None
    path, p = found
    out_f, in_f = p.shape[::-1] if transposed else p.shape
    op = {**_LINEAR_FNS, **_MATMUL_FNS, **_ADDMM_FNS}[node.target] + form
    geometry = LinearGeometry(in_f, out_f, transposed, bias, left)
    return Target(ctx.key_for(node, path, p), LINEAR, geometry, node.name, at, path, op)


@recogniser
def quantized_linear(ctx: Context, node: fx.Node) -> Target | None:
    """A bitsandbytes layer as ``quantized`` captures it: ``lora_fx.linear_4bit`` / ``linear_8bit`` on the packed
    buffers of a ``QuantLinear`` (W [out, in], never dequantized outside the op)."""
    if node.op != "call_function" or node.target not in QUANT_OPS:
        return None
    packed = node.args[1]
    if not isinstance(packed, fx.Node) or packed.op != "get_attr":
        return None
    owner = packed.target.rpartition(".")[0]
    module = ctx.source_module(owner)
    if not isinstance(module, QuantLinear):
        return None
    bias = BiasRef(at=(10, "bias") if QUANT_OPS[node.target] == "4bit" else (3, "bias"))
    geometry = LinearGeometry(module.in_features, module.out_features, False, bias, quant=module.quant,
                              compute_dtype=module.compute_dtype)
    return Target(owner, LINEAR, geometry, node.name, (0, "x"), packed.target, f"bnb {module.quant}")


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
    out_c, in_c = weight.shape[0], weight.shape[1] * groups  # a grouped weight holds in / groups channels
    geometry = ConvGeometry(dims, in_c, out_c, tuple(weight.shape[2:]), stride, padding, dilation, pad, pad_mode,
                            bias, groups)
    return Target(key, CONV, geometry, node.name, at, path, op)


@recogniser
def conv_module(ctx: Context, node: fx.Node) -> Target | Unsupported | None:
    """``call_module`` on nn.Conv1d/2d/3d, with stride, padding, dilation and any padding mode."""
    if node.op != "call_module":
        return None
    m = ctx.module(node.target)
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
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


@recogniser
def multihead_attention_module(ctx: Context, node: fx.Node) -> Unsupported | None:
    """``call_module`` on nn.MultiheadAttention (symbolic_trace keeps it whole): its projections are inside."""
    if node.op != "call_module" or not isinstance(ctx.module(node.target), nn.MultiheadAttention):
        return None
    return Unsupported(node.target, "MultiheadAttention", node.name,
                       "symbolic_trace keeps nn.MultiheadAttention as one call, with its q/k/v projection inside; "
                       "pass example_inputs=(...) to lorafy so torch.export captures the projections")
