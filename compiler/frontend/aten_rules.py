"""Conversion rules from ATen ops (torch.export training IR) to llmc Graph IR nodes.

`RULES` maps each torch op overload (the object, e.g. `torch.ops.aten.add.Tensor`, never
its name) to a small function `rule(cx, *args, **kwargs)`. The arguments are the FX
node's, with every FX node replaced by its converted value: an `ir.Node` for a tensor, a
`Dim` (int or `SymExpr`) for a SymInt, a list for multi-output ops. `cx` is the
converter (see `torch_convert.Converter`): it makes nodes tagged with the source module,
knows the torch-side output type of the node being converted (`cx.out_shape()`,
`cx.out_dtype()`), and casts results to torch's dtype after each rule, so rules only
need to get the dtype right where it changes the arithmetic (integer division, say).
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch

from ..dtypes import DType, promote
from ..ir import Node
from ..ops import (ArangeAttrs, AttentionAttrs, AxisAttrs, FullAttrs, GeluAttrs, NormAttrs, Op, PermuteAttrs,
                   ReduceAttrs, ShapeAttrs, SliceAttrs)
from ..symbolic import SymExpr

aten = torch.ops.aten
hop = torch.ops.higher_order

TORCH_DTYPES: dict[torch.dtype, DType] = {
    torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16, torch.int64: DType.I64,
    torch.int32: DType.I32, torch.int8: DType.I8, torch.uint8: DType.U8, torch.bool: DType.BOOL,
}

RULES: dict[object, Callable] = {}


def rule(*targets):
    def register(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return register


# ---- helpers ---------------------------------------------------------------------------
def _axis(cx, a: int, rank: int) -> int:
    if not -rank <= a < max(rank, 1):
        raise cx.unsupported(f"axis {a} out of range for rank {rank}")
    return a % rank if rank else 0


def _is_num(v) -> bool:
    return isinstance(v, (bool, int, float, SymExpr))


def _scalar_dtype(v, other: DType) -> DType:
    """torch's dtype for a python scalar operand next to a tensor of dtype `other`."""
    if isinstance(v, bool):
        return other
    if isinstance(v, (int, SymExpr)):
        return DType.I64 if other is DType.BOOL else other
    return other if other.is_float else DType.F32


def _binary_operands(cx, a, b, common: DType | None):
    """Both operands as nodes of one dtype: `common`, or the promoted dtype if None."""
    if not isinstance(a, Node) and not isinstance(b, Node):
        raise cx.unsupported("binary op on two scalars")
    if not isinstance(a, Node):
        a = cx.scalar(a, _scalar_dtype(a, b.dtype))
    if not isinstance(b, Node):
        b = cx.scalar(b, _scalar_dtype(b, a.dtype))
    common = common or promote(a.dtype, b.dtype)
    return cx.cast(a, common), cx.cast(b, common)


def _elementwise(op: Op):
    compare = op in (Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE)
    logical = op in (Op.AND, Op.OR)

    def convert(cx, a, b, *, alpha=1):
        if alpha != 1:
            b = _elementwise(Op.MUL)(cx, b, alpha)
        if logical:
            common = DType.BOOL
            if any(isinstance(x, Node) and x.dtype is not DType.BOOL for x in (a, b)):
                raise cx.unsupported("bitwise and/or of non-bool tensors")
        elif compare:
            common = None
        else:
            common = cx.out_dtype()  # torch's promotion, also int / int -> float for div
        a, b = _binary_operands(cx, a, b, common)
        return cx.node(op, (a, b))
    return convert


def _unary(op: Op):
    def convert(cx, x):
        if op is Op.NOT and x.dtype is not DType.BOOL:
            raise cx.unsupported("bitwise not of a non-bool tensor")
        return cx.node(op, (cx.cast(x, cx.out_dtype()),))
    return convert


def _identity(cx, x, *args, **kwargs):
    return x


def _reshape_to_out(cx, x, *args, **kwargs):
    return cx.reshape(x, cx.out_shape())


def _full_value(value, dtype: DType):
    if dtype is DType.BOOL:
        return bool(value)
    return float(value) if dtype.is_float else int(value)


def _full(cx, value):
    dtype = cx.out_dtype()
    return cx.node(Op.FULL, (), FullAttrs(cx.out_shape(), _full_value(value, dtype), dtype))


def _slice(cx, x: Node, axis: int, start, end, step: int = 1) -> Node:
    """x[start:end:step] along axis, with python's clamping for static bounds."""
    n = x.shape[axis]
    if isinstance(start, int) and start < 0:
        start = n + start
    if isinstance(end, int) and end < 0:
        end = n + end
    if isinstance(n, int):
        start = min(max(start, 0), n) if isinstance(start, int) else start
        end = min(max(end, 0), n) if isinstance(end, int) else end
    elif isinstance(end, int) and end >= 2 ** 62:  # "to the end" (INT64_MAX)
        end = n
    if start == 0 and end == n and step == 1:
        return x
    return cx.node(Op.SLICE, (x,), SliceAttrs(axis, start, end, step))


def _permute(cx, x: Node, perm) -> Node:
    perm = tuple(perm)
    if perm == tuple(range(len(perm))):
        return x
    return cx.node(Op.PERMUTE, (x,), PermuteAttrs(perm))


def _matmul(cx, a: Node, b: Node) -> Node:
    """torch.matmul: 1-D operands get a unit dim that is removed again."""
    a2 = cx.reshape(a, (1,) + a.shape) if a.type.rank == 1 else a
    b2 = cx.reshape(b, b.shape + (1,)) if b.type.rank == 1 else b
    out = cx.node(Op.MATMUL, (a2, b2))
    if a.type.rank == 1 or b.type.rank == 1:
        out = cx.reshape(out, cx.out_shape())
    return out


# ---- shapes and symbolic sizes ----------------------------------------------------------
@rule(aten.sym_size.int)
def _sym_size(cx, x, dim):
    return x.shape[_axis(cx, dim, x.type.rank)]


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
      aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.unflatten.int,
      aten.view_copy.default, aten.view_as.default, aten.reshape_as.default)
def _reshape(cx, x, *args, **kwargs):
    return _reshape_to_out(cx, x)


@rule(aten.expand.default, aten.expand_copy.default, aten.broadcast_to.default)
def _expand(cx, x, size, *, implicit=False):
    shape = cx.out_shape()
    if tuple(x.shape) == tuple(shape):
        return x
    return cx.node(Op.EXPAND, (x,), ShapeAttrs(shape))


@rule(aten.expand_as.default)
def _expand_as(cx, x, other):
    return _expand(cx, x, None)


@rule(aten.transpose.int)
def _transpose(cx, x, d0, d1):
    perm = list(range(x.type.rank))
    d0, d1 = _axis(cx, d0, x.type.rank), _axis(cx, d1, x.type.rank)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permute(cx, x, perm)


@rule(aten.permute.default)
def _permute_rule(cx, x, dims):
    return _permute(cx, x, [_axis(cx, d, x.type.rank) for d in dims])


@rule(aten.t.default, aten.numpy_T.default)
def _t(cx, x):
    return _permute(cx, x, list(reversed(range(x.type.rank))))


@rule(aten.slice.Tensor)
def _slice_rule(cx, x, dim=0, start=None, end=None, step=1):
    axis = _axis(cx, dim, x.type.rank)
    start = 0 if start is None else start
    end = 2 ** 63 - 1 if end is None else end
    if step != 1 and not (isinstance(start, int) and isinstance(x.shape[axis], int)):
        raise cx.unsupported("strided slice of a symbolic extent")
    return _slice(cx, x, axis, start, end, step)


@rule(aten.select.int)
def _select(cx, x, dim, index):
    axis = _axis(cx, dim, x.type.rank)
    if isinstance(index, int) and index < 0:
        start = x.shape[axis] + index
    else:
        start = index
    return cx.reshape(_slice(cx, x, axis, start, start + 1), cx.out_shape())


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_split.Tensor,
      aten.tensor_split.sections)
def _split(cx, x, _sizes, dim=0):
    axis = _axis(cx, dim, x.type.rank)
    pieces, start = [], 0
    for i in range(len(cx.val)):
        size = cx.out_shape(i)[axis]
        pieces.append(_slice(cx, x, axis, start, start + size))
        start = start + size
    return pieces


@rule(aten.unbind.int)
def _unbind(cx, x, dim=0):
    axis = _axis(cx, dim, x.type.rank)
    return [cx.reshape(_slice(cx, x, axis, i, i + 1), cx.out_shape(i)) for i in range(len(cx.val))]


@rule(aten.cat.default, aten.concat.default)
def _cat(cx, tensors, dim=0):
    tensors = [t for t in tensors if not (t.type.rank == 1 and t.shape[0] == 0)]  # legacy empty operands
    dtype = cx.out_dtype()
    axis = _axis(cx, dim, tensors[0].type.rank)
    if len(tensors) == 1:
        return tensors[0]
    return cx.node(Op.CONCAT, [cx.cast(t, dtype) for t in tensors], AxisAttrs(axis))


@rule(operator.getitem)
def _getitem(cx, seq, i):
    return seq[i]


# ---- identities, casts and asserts -------------------------------------------------------
RULES.update({t: _identity for t in (
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default, aten.detach_.default,
    aten.lift_fresh_copy.default, aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
)})  # dropout: the graph is an inference graph


@rule(aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
      aten._assert_async.msg)
def _drop(cx, *args, **kwargs):
    return None


@rule(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default, aten.type_as.default)
def _to(cx, x, *args, **kwargs):
    return cx.cast(x, cx.out_dtype())


# ---- sources -------------------------------------------------------------------------
@rule(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(cx, *args, **kwargs):
    nums = [a for a in args if _is_num(a)]
    start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums + [1])[:3]
    for v in (start, end, step):
        if isinstance(v, float) and not v.is_integer():
            raise cx.unsupported("arange with fractional bounds")
    start, end, step = (int(v) if isinstance(v, float) else v for v in (start, end, step))
    if not isinstance(step, int) or step < 1:
        raise cx.unsupported(f"arange step {step}")
    return cx.node(Op.ARANGE, (), ArangeAttrs(start, end, step, cx.out_dtype()))


@rule(aten.new_ones.default, aten.ones.default, aten.ones_like.default)
def _ones(cx, *args, **kwargs):
    return _full(cx, 1)


@rule(aten.new_zeros.default, aten.zeros.default, aten.zeros_like.default, aten.new_empty.default,
      aten.empty.memory_format, aten.empty_like.default)
def _zeros(cx, *args, **kwargs):
    return _full(cx, 0)


@rule(aten.full.default)
def _full_rule(cx, size, value, **kwargs):
    return _full(cx, value)


@rule(aten.new_full.default)
def _new_full(cx, x, size, value, **kwargs):
    return _full(cx, value)


@rule(aten.full_like.default)
def _full_like(cx, x, value, **kwargs):
    return _full(cx, value)


@rule(aten.scalar_tensor.default)
def _scalar_tensor(cx, value, **kwargs):
    return cx.scalar(value, cx.out_dtype())


# ---- elementwise -------------------------------------------------------------------------
for _op, _targets in {
    Op.ADD: (aten.add.Tensor, aten.add.Scalar), Op.SUB: (aten.sub.Tensor, aten.sub.Scalar),
    Op.MUL: (aten.mul.Tensor, aten.mul.Scalar), Op.DIV: (aten.div.Tensor, aten.div.Scalar),
    Op.POW: (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar),
    Op.MAXIMUM: (aten.maximum.default,), Op.MINIMUM: (aten.minimum.default,),
    Op.EQ: (aten.eq.Tensor, aten.eq.Scalar), Op.NE: (aten.ne.Tensor, aten.ne.Scalar),
    Op.LT: (aten.lt.Tensor, aten.lt.Scalar), Op.LE: (aten.le.Tensor, aten.le.Scalar),
    Op.GT: (aten.gt.Tensor, aten.gt.Scalar), Op.GE: (aten.ge.Tensor, aten.ge.Scalar),
    Op.AND: (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default),
    Op.OR: (aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default),
}.items():
    rule(*_targets)(_elementwise(_op))

for _op, _targets in {
    Op.NEG: (aten.neg.default,), Op.EXP: (aten.exp.default,), Op.LOG: (aten.log.default,),
    Op.SQRT: (aten.sqrt.default,), Op.RSQRT: (aten.rsqrt.default,), Op.TANH: (aten.tanh.default,),
    Op.ERF: (aten.erf.default,), Op.SIGMOID: (aten.sigmoid.default,), Op.RELU: (aten.relu.default,),
    Op.SILU: (aten.silu.default,), Op.ABS: (aten.abs.default,), Op.SIN: (aten.sin.default,),
    Op.COS: (aten.cos.default,), Op.RECIPROCAL: (aten.reciprocal.default,),
    Op.NOT: (aten.logical_not.default, aten.bitwise_not.default),
}.items():
    rule(*_targets)(_unary(_op))


@rule(aten.div.Tensor_mode)
def _div_mode(cx, a, b, *, rounding_mode=None):
    if rounding_mode is not None:
        raise cx.unsupported(f"division with rounding_mode={rounding_mode!r}")
    return _elementwise(Op.DIV)(cx, a, b)


@rule(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(cx, x, other, alpha=1):
    if alpha != 1:
        x = _elementwise(Op.MUL)(cx, x, alpha)
    return _elementwise(Op.SUB)(cx, other, x)


@rule(aten.gelu.default)
def _gelu(cx, x, *, approximate="none"):
    return cx.node(Op.GELU, (x,), GeluAttrs(approximate == "tanh"))


@rule(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(cx, cond, a, b):
    dtype = cx.out_dtype()
    a = cx.cast(a, dtype) if isinstance(a, Node) else cx.scalar(a, dtype)
    b = cx.cast(b, dtype) if isinstance(b, Node) else cx.scalar(b, dtype)
    return cx.node(Op.WHERE, (cx.cast(cond, DType.BOOL), a, b))


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(cx, x, mask, value):
    value = cx.cast(value, x.dtype) if isinstance(value, Node) else cx.scalar(value, x.dtype)
    return cx.node(Op.WHERE, (cx.cast(mask, DType.BOOL), value, x))


@rule(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(cx, x, lo=None, hi=None):
    if cx.target is aten.clamp_max.default:
        lo, hi = None, lo
    dtype = cx.out_dtype()
    x = cx.cast(x, dtype)
    if lo is not None:
        x = cx.node(Op.MAXIMUM, (x, cx.scalar(lo, dtype)))
    if hi is not None:
        x = cx.node(Op.MINIMUM, (x, cx.scalar(hi, dtype)))
    return x


# ---- reductions and scans -------------------------------------------------------------------
def _reduce(op: Op):
    def convert(cx, x, dims=None, keepdim=False, *, dtype=None):
        axes = tuple(range(x.type.rank)) if not dims else tuple(sorted({_axis(cx, d, x.type.rank) for d in dims}))
        x = cx.cast(x, cx.out_dtype())
        return cx.node(op, (x,), ReduceAttrs(axes, bool(keepdim)))
    return convert


rule(aten.mean.dim)(_reduce(Op.MEAN))
rule(aten.sum.dim_IntList)(_reduce(Op.SUM))
rule(aten.amax.default)(_reduce(Op.MAX))
rule(aten.amin.default)(_reduce(Op.MIN))


@rule(aten.mean.default, aten.sum.default)
def _reduce_all(cx, x, *, dtype=None):
    return _reduce(Op.MEAN if cx.target is aten.mean.default else Op.SUM)(cx, x)


@rule(aten.cumsum.default)
def _cumsum(cx, x, dim, *, dtype=None):
    return cx.node(Op.CUMSUM, (x,), AxisAttrs(_axis(cx, dim, x.type.rank)))


@rule(aten.diff.default)
def _diff(cx, x, n=1, dim=-1, prepend=None, append=None):
    axis = _axis(cx, dim, x.type.rank)
    parts = [p for p in (prepend, x, append) if p is not None]
    if len(parts) > 1:
        x = cx.node(Op.CONCAT, parts, AxisAttrs(axis))
    for _ in range(n):
        size = x.shape[axis]
        hi, lo = _slice(cx, x, axis, 1, size), _slice(cx, x, axis, 0, size - 1)
        x = cx.node(Op.NE if x.dtype is DType.BOOL else Op.SUB, (hi, lo))
    return x


@rule(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
def _softmax(cx, x, dim, *rest, **kwargs):
    return cx.node(Op.SOFTMAX, (cx.cast(x, cx.out_dtype()),), AxisAttrs(_axis(cx, dim, x.type.rank)))


# ---- indexing ---------------------------------------------------------------------------
@rule(aten.embedding.default)
def _embedding(cx, weight, indices, *args, **kwargs):
    return cx.node(Op.TAKE, (weight, indices), AxisAttrs(0))


@rule(aten.index_select.default)
def _index_select(cx, x, dim, index):
    return cx.node(Op.TAKE, (x, index), AxisAttrs(_axis(cx, dim, x.type.rank)))


@rule(aten.gather.default)
def _gather(cx, x, dim, index, *, sparse_grad=False):
    return cx.node(Op.GATHER, (x, index), AxisAttrs(_axis(cx, dim, x.type.rank)))


@rule(aten.index.Tensor)
def _index(cx, x, indices):
    """x[i0, i1, ...] with `None` for untouched dims, by numpy's advanced-indexing rules."""
    if any(i is not None and not i.dtype.is_int for i in indices):
        raise cx.unsupported("boolean mask indexing (data-dependent shape)")
    pos = [k for k, i in enumerate(indices) if i is not None]
    idx = [indices[k] for k in pos]
    rest = [k for k in range(x.type.rank) if k not in pos]
    out = cx.node(Op.INDEX, [_permute(cx, x, pos + rest)] + idx)
    nb = out.type.rank - len(rest)  # the broadcast index dims lead the result
    if pos == list(range(pos[0], pos[0] + len(pos))) and pos[0] > 0:
        k = pos[0]  # one contiguous block: numpy keeps the indexed dims in place
        perm = list(range(nb, nb + k)) + list(range(nb)) + list(range(nb + k, out.type.rank))
        out = _permute(cx, out, perm)
    return out


# ---- linear algebra and normalisation ---------------------------------------------------------
@rule(aten.linear.default)
def _linear(cx, x, weight, bias=None):
    y = _matmul(cx, x, _permute(cx, weight, (1, 0)))
    return y if bias is None else cx.node(Op.ADD, (y, bias))


@rule(aten.addmm.default)
def _addmm(cx, bias, a, b, *, beta=1, alpha=1):
    y = cx.node(Op.MATMUL, (a, b))
    if alpha != 1:
        y = _elementwise(Op.MUL)(cx, y, alpha)
    if beta != 1:
        bias = _elementwise(Op.MUL)(cx, bias, beta)
    return cx.node(Op.ADD, (y, bias)) if beta != 0 else y


@rule(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul_rule(cx, a, b):
    return _matmul(cx, a, b)


@rule(aten.layer_norm.default)
def _layer_norm(cx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if len(normalized_shape) != 1:
        raise cx.unsupported(f"layer_norm over {len(normalized_shape)} trailing dims")
    d = normalized_shape[0]
    if weight is None:
        weight = cx.node(Op.FULL, (), FullAttrs((d,), 1.0, x.dtype))
    if bias is None:
        bias = cx.node(Op.FULL, (), FullAttrs((d,), 0.0, x.dtype))
    return cx.node(Op.LAYER_NORM, (x, weight, bias), NormAttrs(float(eps)))


@rule(aten.rms_norm.default)
def _rms_norm(cx, x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        raise cx.unsupported(f"rms_norm over {len(normalized_shape)} trailing dims")
    if weight is None:
        weight = cx.node(Op.FULL, (), FullAttrs((normalized_shape[0],), 1.0, x.dtype))
    eps = torch.finfo(torch.float32).eps if eps is None else eps  # torch's default for fp32
    return cx.node(Op.RMS_NORM, (x, weight), NormAttrs(float(eps)))


@rule(aten.scaled_dot_product_attention.default)
def _sdpa(cx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
        raise cx.unsupported(f"attention operands of rank {q.type.rank}/{k.type.rank}/{v.type.rank} (need [B, H, S, D])")
    if not isinstance(q.shape[-1], int):
        raise cx.unsupported("attention with a symbolic head dim")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal = bool(is_causal)
    if causal and q.shape[2] != k.shape[2]:
        # torch aligns the causal mask top-left (query i sees keys j <= i); spell it out.
        rows = cx.node(Op.ARANGE, (), ArangeAttrs(0, q.shape[2], 1, DType.I64))
        cols = cx.node(Op.ARANGE, (), ArangeAttrs(0, k.shape[2], 1, DType.I64))
        attn_mask = cx.node(Op.LE, (cx.reshape(cols, (1, k.shape[2])), cx.reshape(rows, (q.shape[2], 1))))
        causal = False
    inputs = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    return cx.node(Op.ATTENTION, inputs, AttentionAttrs(scale, causal, attn_mask is not None))


# ---- higher-order ops: inline the wrapped submodule -----------------------------------------
@rule(hop.wrap_with_set_grad_enabled)
def _set_grad(cx, enabled, submod, *args):
    return cx.inline(submod, args)


@rule(hop.wrap_with_autocast)
def _autocast(cx, device_type, dtype, enabled, cache_enabled, submod, *args):
    if enabled:
        raise cx.unsupported(f"autocast region enabled for {dtype} (mixed precision is not modelled)")
    return cx.inline(submod, args)



# More rules register themselves into RULES: compositions of the ops above and in-place
# variants, then top-k routing and routed experts (mixture-of-experts).
from . import aten_rules_composite  # noqa: E402,F401  pylint: disable=wrong-import-position,cyclic-import
from . import aten_rules_moe  # noqa: E402,F401
