"""More ATen rules, each decomposed into ops the IR already has, and the in-place variants.

Registered into `aten_rules.RULES` when `aten_rules` is imported. Everything here is a
composition of existing IR ops (repeat = reshape + expand + reshape, baddbmm = matmul +
scaled add, triu = a where over an arange comparison, ...), so the reference interpreter
and every backend support them with no new lowering.

In-place ops (`add_`, `masked_fill_`, ...) are converted as their out-of-place twin; the
converter then rebinds the mutated FX node to the result (`cx.rebind`), so later readers of
the tensor see the new value. `cx.rebind` refuses a mutation that other views of the same
storage would observe, rather than silently returning stale values.
"""
from __future__ import annotations

import torch

from ..dtypes import DType
from ..ir import Node
from ..ops import ArangeAttrs, AxisAttrs, FullAttrs, Op, ShapeAttrs
from .aten_rules import (RULES, _axis, _binary_operands, _clamp, _elementwise, _full_value, _matmul, _permute, _slice,
                         rule)

aten = torch.ops.aten


def _unsqueeze(cx, x: Node, axis: int) -> Node:
    return cx.reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


# ---- data movement -------------------------------------------------------------------------
@rule(aten.repeat.default)
def _repeat(cx, x, repeats):
    """x.repeat(r0, r1, ...): tile; leading repeats add dims. Each tiled axis: [n] -> [r, n] -> [r*n]."""
    repeats = list(repeats)
    x = cx.reshape(x, (1,) * (len(repeats) - x.type.rank) + tuple(x.shape))
    shape = list(x.shape)
    for axis, r in enumerate(repeats):
        if r == 1:
            continue
        y = _unsqueeze(cx, x, axis)
        y = cx.node(Op.EXPAND, (y,), ShapeAttrs(y.shape[:axis] + (r,) + y.shape[axis + 1:]))
        shape[axis] = r * shape[axis]
        x = cx.reshape(y, tuple(shape))
    return x


@rule(aten.repeat_interleave.self_int)
def _repeat_interleave(cx, x, repeats, dim=None, *, output_size=None):
    """Each element repeated `repeats` times along dim: [n] -> [n, 1] -> [n, r] -> [n*r]."""
    if isinstance(repeats, Node):
        raise cx.unsupported("repeat_interleave with tensor repeats (data-dependent shape)")
    if dim is None:  # over the flattened tensor
        n = 1
        for d in x.shape:
            n = d * n
        x = cx.reshape(x, (n,))
    axis = _axis(cx, 0 if dim is None else dim, x.type.rank)
    y = _unsqueeze(cx, x, axis + 1)
    y = cx.node(Op.EXPAND, (y,), ShapeAttrs(y.shape[:axis + 1] + (repeats,) + y.shape[axis + 2:]))
    return cx.reshape(y, cx.out_shape())


@rule(aten.stack.default)
def _stack(cx, tensors, dim=0):
    axis = _axis(cx, dim, tensors[0].type.rank + 1)
    dtype = cx.out_dtype()
    parts = [_unsqueeze(cx, cx.cast(t, dtype), axis) for t in tensors]
    return parts[0] if len(parts) == 1 else cx.node(Op.CONCAT, parts, AxisAttrs(axis))


@rule(aten.flip.default)
def _flip(cx, x, dims):
    """Reversal as a take with the indices n-1, ..., 0."""
    for d in dims:
        axis = _axis(cx, d, x.type.rank)
        n = x.shape[axis]
        idx = cx.node(Op.SUB, (cx.scalar(n - 1, DType.I64), cx.node(Op.ARANGE, (), ArangeAttrs(0, n, 1, DType.I64))))
        x = cx.node(Op.TAKE, (x, idx), AxisAttrs(axis))
    return x


@rule(aten.movedim.int)
def _movedim(cx, x, src, dst):
    rank = x.type.rank
    src, dst = _axis(cx, src, rank), _axis(cx, dst, rank)
    perm = [a for a in range(rank) if a != src]
    perm.insert(dst, src)
    return _permute(cx, x, perm)


@rule(aten.narrow.default)
def _narrow(cx, x, dim, start, length):
    axis = _axis(cx, dim, x.type.rank)
    if isinstance(start, int) and start < 0:
        start = x.shape[axis] + start
    return _slice(cx, x, axis, start, start + length)


# ---- elementwise compositions ------------------------------------------------------------
@rule(aten.square.default)
def _square(cx, x):
    x = cx.cast(x, cx.out_dtype())
    return cx.node(Op.MUL, (x, x))


@rule(aten.clamp.Tensor, aten.clamp_min.Tensor)
def _clamp_tensor(cx, x, lo=None, hi=None):
    if lo is not None:
        x = cx.node(Op.MAXIMUM, _binary_operands(cx, x, lo, cx.out_dtype()))
    if hi is not None:
        x = cx.node(Op.MINIMUM, _binary_operands(cx, x, hi, cx.out_dtype()))
    return x


@rule(aten.clamp_max.Tensor)
def _clamp_max_tensor(cx, x, hi):
    return _clamp_tensor(cx, x, None, hi)


@rule(aten.max.other)
def _max_other(cx, a, b):
    return cx.node(Op.MAXIMUM, _binary_operands(cx, a, b, cx.out_dtype()))


@rule(aten.min.other)
def _min_other(cx, a, b):
    return cx.node(Op.MINIMUM, _binary_operands(cx, a, b, cx.out_dtype()))


@rule(aten.sign.default)
def _sign(cx, x):
    """(x > 0) - (x < 0), in x's dtype."""
    zero = cx.scalar(0, x.dtype)
    pos, neg = cx.cast(cx.node(Op.GT, (x, zero)), x.dtype), cx.cast(cx.node(Op.LT, (x, zero)), x.dtype)
    return cx.node(Op.SUB, (pos, neg))


def _trunc(cx, x: Node) -> Node:
    """Round toward zero through an integer cast (exact for |x| < 2**63)."""
    return cx.cast(cx.cast(x, DType.I64), x.dtype)


@rule(aten.trunc.default)
def _trunc_rule(cx, x):
    return _trunc(cx, x) if x.dtype.is_float else x


@rule(aten.floor.default)
def _floor(cx, x):
    if not x.dtype.is_float:
        return x
    t = _trunc(cx, x)  # trunc rounds negative non-integers up: step down once
    return cx.node(Op.SUB, (t, cx.cast(cx.node(Op.GT, (t, x)), x.dtype)))


@rule(aten.ceil.default)
def _ceil(cx, x):
    if not x.dtype.is_float:
        return x
    t = _trunc(cx, x)  # trunc rounds positive non-integers down: step up once
    return cx.node(Op.ADD, (t, cx.cast(cx.node(Op.LT, (t, x)), x.dtype)))


@rule(aten.log1p.default)
def _log1p(cx, x):
    x = cx.cast(x, cx.out_dtype())
    return cx.node(Op.LOG, (cx.node(Op.ADD, (x, cx.scalar(1, x.dtype))),))


@rule(aten.expm1.default)
def _expm1(cx, x):
    x = cx.cast(x, cx.out_dtype())
    return cx.node(Op.SUB, (cx.node(Op.EXP, (x,)), cx.scalar(1, x.dtype)))


@rule(aten.softplus.default)
def _softplus(cx, x, beta=1, threshold=20):
    """log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (torch's rule)."""
    bx = _elementwise(Op.MUL)(cx, x, beta) if beta != 1 else x
    soft = cx.node(Op.LOG, (cx.node(Op.ADD, (cx.node(Op.EXP, (bx,)), cx.scalar(1, x.dtype))),))
    if beta != 1:
        soft = _elementwise(Op.DIV)(cx, soft, beta)
    return cx.node(Op.WHERE, (cx.node(Op.GT, (bx, cx.scalar(threshold, x.dtype))), x, soft))


@rule(aten.addcmul.default)
def _addcmul(cx, x, a, b, *, value=1):
    prod = _elementwise(Op.MUL)(cx, a, b)
    if value != 1:
        prod = _elementwise(Op.MUL)(cx, prod, value)
    return _elementwise(Op.ADD)(cx, x, prod)


@rule(aten.lerp.Scalar)
def _lerp(cx, x, end, weight):
    diff = _elementwise(Op.SUB)(cx, end, x)
    return _elementwise(Op.ADD)(cx, x, _elementwise(Op.MUL)(cx, diff, weight))


# ---- linear algebra -----------------------------------------------------------------------
@rule(aten.baddbmm.default)
def _baddbmm(cx, x, b1, b2, *, beta=1, alpha=1):
    """beta * x + alpha * (b1 @ b2) (ALiBi attention scores, say)."""
    y = _matmul(cx, b1, b2)
    if alpha != 1:
        y = _elementwise(Op.MUL)(cx, y, alpha)
    if beta == 0:  # torch ignores x then, NaN included
        return y
    if beta != 1:
        x = _elementwise(Op.MUL)(cx, x, beta)
    return _elementwise(Op.ADD)(cx, y, x)


@rule(aten.outer.default)
def _outer(cx, a, b):
    a, b = _binary_operands(cx, a, b, cx.out_dtype())
    return cx.node(Op.MUL, (cx.reshape(a, (a.shape[0], 1)), cx.reshape(b, (1, b.shape[0]))))


# ---- masks ---------------------------------------------------------------------------------
def _tri(cx, x, diagonal, upper: bool):
    """Keep x[..., i, j] where j - i >= diagonal (triu) or j - i <= diagonal (tril); 0 elsewhere."""
    rows, cols = x.shape[-2], x.shape[-1]
    r = cx.reshape(cx.node(Op.ARANGE, (), ArangeAttrs(0, rows, 1, DType.I64)), (rows, 1))
    c = cx.reshape(cx.node(Op.ARANGE, (), ArangeAttrs(0, cols, 1, DType.I64)), (1, cols))
    shifted = cx.node(Op.ADD, (r, cx.scalar(diagonal, DType.I64)))
    keep = cx.node(Op.GE if upper else Op.LE, (c, shifted))
    zero = cx.node(Op.FULL, (), FullAttrs((), False if x.dtype is DType.BOOL else 0, x.dtype))
    return cx.node(Op.WHERE, (keep, x, zero))


@rule(aten.triu.default)
def _triu(cx, x, diagonal=0):
    return _tri(cx, x, diagonal, upper=True)


@rule(aten.tril.default)
def _tril(cx, x, diagonal=0):
    return _tri(cx, x, diagonal, upper=False)


@rule(aten.fill.Scalar)
def _fill(cx, x, value):
    return cx.node(Op.FULL, (), FullAttrs(cx.out_shape(), _full_value(value, cx.out_dtype()), cx.out_dtype()))


@rule(aten.fill.Tensor)
def _fill_tensor(cx, x, value):
    return cx.node(Op.EXPAND, (cx.cast(cx.reshape(value, ()), cx.out_dtype()),), ShapeAttrs(cx.out_shape()))


@rule(aten.zero.default)
def _zero(cx, x):
    return _fill(cx, x, 0)


@rule(aten.copy.default)
def _copy(cx, dst, src, non_blocking=False):
    """dst's shape and dtype, src's values (broadcast)."""
    src = cx.cast(src, cx.out_dtype())
    if tuple(src.shape) == tuple(cx.out_shape()):
        return src
    return cx.node(Op.EXPAND, (src,), ShapeAttrs(cx.out_shape()))


# ---- in-place variants ----------------------------------------------------------------------
def _inplace(out_of_place):
    def convert(cx, x, *args, **kwargs):
        out = out_of_place(cx, x, *args, **kwargs)
        out = cx.cast(out, x.dtype)  # an in-place op keeps self's dtype
        cx.rebind(cx.fx.args[0], out)
        return out
    return convert


_INPLACE = {
    aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar,
    aten.sub_.Tensor: aten.sub.Tensor, aten.sub_.Scalar: aten.sub.Scalar,
    aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar,
    aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Scalar,
    aten.pow_.Scalar: aten.pow.Tensor_Scalar, aten.pow_.Tensor: aten.pow.Tensor_Tensor,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.masked_fill_.Tensor: aten.masked_fill.Tensor,
    aten.clamp_.default: aten.clamp.default, aten.clamp_min_.default: aten.clamp_min.default,
    aten.clamp_.Tensor: aten.clamp.Tensor,
    aten.neg_.default: aten.neg.default, aten.exp_.default: aten.exp.default, aten.tanh_.default: aten.tanh.default,
    aten.sigmoid_.default: aten.sigmoid.default, aten.relu_.default: aten.relu.default,
    aten.sqrt_.default: aten.sqrt.default, aten.rsqrt_.default: aten.rsqrt.default, aten.abs_.default: aten.abs.default,
    aten.reciprocal_.default: aten.reciprocal.default, aten.square_.default: aten.square.default,
    aten.fill_.Scalar: aten.fill.Scalar, aten.fill_.Tensor: aten.fill.Tensor, aten.zero_.default: aten.zero.default,
    aten.copy_.default: aten.copy.default, aten.tril_.default: aten.tril.default, aten.triu_.default: aten.triu.default,
    aten.floor_.default: aten.floor.default, aten.ceil_.default: aten.ceil.default, aten.log_.default: aten.log.default,
    aten.erf_.default: aten.erf.default, aten.expm1_.default: aten.expm1.default, aten.sin_.default: aten.sin.default, aten.cos_.default: aten.cos.default,
}
for _inp, _oop in _INPLACE.items():
    if _oop in RULES:
        RULES[_inp] = _inplace(RULES[_oop])
# clamp_max's rule reads its one bound as `hi` only under the functional target
RULES[aten.clamp_max_.default] = _inplace(lambda cx, x, hi: _clamp(cx, x, None, hi))
