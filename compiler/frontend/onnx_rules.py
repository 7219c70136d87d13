"""ONNX operator -> llmc IR conversion rules, one small function per operator family.

`RULES` maps (domain, op_type) to a function taking a `NodeCtx` and returning the node's
output values. Rules build IR through `NodeCtx.apply`, which folds the op instead when
its inputs are known at import time. Data movement and shape ops live in
`onnx_rules_shape`, opset-23 Attention/RotaryEmbedding in `onnx_rules_attention`; both
register into the same table.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ...errors import LLMCError, UnsupportedOpError
from ..dtypes import DType
from ..ops import (AxisAttrs, CastAttrs, GeluAttrs, NormAttrs, Op, PermuteAttrs, ReduceAttrs,
                   ShapeAttrs)
from .onnx_context import NodeCtx, Val, onnx_dtype
from . import onnx_known as K

RULES: dict[tuple[str, str], Callable[[NodeCtx], object]] = {}


def rule(*op_types: str, domain: str = ""):
    def deco(fn):
        for t in op_types:
            RULES[(domain, t)] = fn
        return fn
    return deco


# ---- helpers shared by the rules ----------------------------------------------------------
def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise LLMCError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank


def norm_axes(axes, rank: int) -> tuple[int, ...]:
    out = tuple(norm_axis(a, rank) for a in axes)
    if len(set(out)) != len(out):
        raise LLMCError(f"repeated axes {list(axes)}")
    return out


def scalar(x: NodeCtx, value, dtype: DType) -> Val:
    try:
        with np.errstate(all="ignore"):
            return x.const(np.array(value).astype(dtype.numpy), dtype)
    except (OverflowError, ValueError, TypeError):
        raise LLMCError(f"constant {value!r} does not fit {dtype.value}") from None


def reshape(x: NodeCtx, v: Val, shape) -> Val:
    shape = tuple(shape)
    if tuple(v.shape) == shape:
        return v
    return x.apply(Op.RESHAPE, [v], ShapeAttrs(shape))


def cast(x: NodeCtx, v: Val, dtype: DType) -> Val:
    return v if v.dtype is dtype else x.apply(Op.CAST, [v], CastAttrs(dtype))


def permute(x: NodeCtx, v: Val, perm) -> Val:
    perm = tuple(perm)
    return v if perm == tuple(range(len(perm))) else x.apply(Op.PERMUTE, [v], PermuteAttrs(perm))


def numel(shape) -> object:
    n = 1
    for d in shape:
        n = d * n
    return n


# ---- elementwise --------------------------------------------------------------------------
_UNARY = {"Neg": Op.NEG, "Exp": Op.EXP, "Log": Op.LOG, "Sqrt": Op.SQRT, "Reciprocal": Op.RECIPROCAL,
          "Abs": Op.ABS, "Erf": Op.ERF, "Tanh": Op.TANH, "Sigmoid": Op.SIGMOID, "Relu": Op.RELU,
          "Sin": Op.SIN, "Cos": Op.COS, "Not": Op.NOT}


def check_types(x: NodeCtx, vals, logical: bool) -> None:
    """ONNX type constraints numpy would trip over: arithmetic on bool, logic on non-bool."""
    for v in vals:
        if (v.dtype is DType.BOOL) != logical:
            raise LLMCError(f"{x.op_type} does not take {v.dtype.value} operands")


@rule(*_UNARY)
def _unary(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=x.op_type == "Not")
    return x.apply(_UNARY[x.op_type], [v])


# ops numpy can fold but the IR cannot run: fine on constants, an error on runtime data
_FOLD_ONLY_UNARY = {"Floor": np.floor, "Ceil": np.ceil, "Round": np.round, "Sign": np.sign}


@rule(*_FOLD_ONLY_UNARY)
def _fold_only_unary(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    if v.known is None or K.has_symbols(v.known):
        if v.known is not None and x.op_type in ("Floor", "Ceil", "Round"):
            return v  # exact integers
        if x.op_type == "Sign":  # (x > 0) ? 1 : (x < 0) ? -1 : x * 0  (keeps NaN and zero)
            zero = scalar(x, 0, v.dtype)
            neg = zero if v.dtype is DType.U8 else scalar(x, -1, v.dtype)
            rest = x.apply(Op.WHERE, [x.apply(Op.LT, [v, zero]), neg, x.apply(Op.MUL, [v, zero])])
            return x.apply(Op.WHERE, [x.apply(Op.GT, [v, zero]), scalar(x, 1, v.dtype), rest])
        raise UnsupportedOpError(f"{x.op_type} is only supported on values known at import time")
    with np.errstate(all="ignore"):
        return x.const(_FOLD_ONLY_UNARY[x.op_type](v.known), v.dtype)


_BINARY = {"Add": Op.ADD, "Sub": Op.SUB, "Mul": Op.MUL, "Div": Op.DIV, "Pow": Op.POW,
           "Equal": Op.EQ, "Less": Op.LT, "LessOrEqual": Op.LE, "Greater": Op.GT,
           "GreaterOrEqual": Op.GE, "And": Op.AND, "Or": Op.OR, "Xor": Op.NE}


@rule(*_BINARY)
def _binary(x: NodeCtx):
    a, b = x.val(0), x.val(1)
    if x.op_type in ("And", "Or", "Xor"):
        check_types(x, [a, b], logical=True)
    elif x.op_type not in ("Equal",):
        check_types(x, [a, b], logical=False)
    out = x.apply(_BINARY[x.op_type], [a, b])
    return cast(x, out, a.dtype) if x.op_type == "Pow" else out  # Pow keeps the base's type


@rule("Mod")
def _mod(x: NodeCtx):
    a, b = x.val(0), x.val(1)
    check_types(x, [a, b], logical=False)
    if a.known is None or b.known is None or K.has_symbols(a.known) or K.has_symbols(b.known):
        raise UnsupportedOpError("Mod is only supported on values known at import time")
    if a.dtype is not b.dtype:
        raise LLMCError(f"Mod operands differ in type ({a.dtype.value}, {b.dtype.value})")
    try:
        shape = np.broadcast_shapes(a.known.shape, b.known.shape)
    except ValueError as e:
        raise LLMCError(str(e)) from None
    if not K.small(shape):
        raise UnsupportedOpError("Mod of large constants is not supported")
    with np.errstate(all="ignore"):
        fn = np.fmod if x.attr_int("fmod", 0) else np.mod
        return x.const(fn(a.known, b.known), a.dtype)


@rule("Max", "Min", "Sum", "Mean")
def _variadic(x: NodeCtx):
    op = {"Max": Op.MAXIMUM, "Min": Op.MINIMUM, "Sum": Op.ADD, "Mean": Op.ADD}[x.op_type]
    vals = x.vals()
    if not vals:
        raise LLMCError("needs at least one input")
    check_types(x, vals, logical=False)
    acc = vals[0]
    for v in vals[1:]:
        acc = x.apply(op, [acc, v])
    if x.op_type == "Mean" and len(vals) > 1:
        acc = x.apply(Op.DIV, [acc, scalar(x, len(vals), acc.dtype)])
    return acc


@rule("Where")
def _where(x: NodeCtx):
    return x.apply(Op.WHERE, [x.val(0), x.val(1), x.val(2)])


@rule("Cast")
def _cast(x: NodeCtx):
    to = x.attr_int("to")
    if to is None:
        raise LLMCError("missing attribute 'to'")
    return cast(x, x.val(0), onnx_dtype(to, "attribute 'to'"))


@rule("CastLike")
def _cast_like(x: NodeCtx):
    return cast(x, x.val(0), x.val(1).dtype)


@rule("Identity")
def _identity(x: NodeCtx):
    return x.val(0)


@rule("Dropout")
def _dropout(x: NodeCtx):  # inference: identity, and an all-true mask
    v = x.val(0)
    if x.has(2) and (x.val(2).known is None or bool(np.any(x.known(2)))):
        raise UnsupportedOpError("Dropout in training mode is not supported")
    return [v, x.apply(Op.EXPAND, [scalar(x, True, DType.BOOL)], ShapeAttrs(v.shape))
            if len(x.proto.output) > 1 and x.proto.output[1] else None]


@rule("IsNaN")
def _isnan(x: NodeCtx):
    v = x.val(0)
    return x.apply(Op.NE, [v, v])


@rule("IsInf")
def _isinf(x: NodeCtx):
    v = x.val(0)
    if not v.dtype.is_float:
        return x.apply(Op.NE, [v, v])  # integers are never infinite
    pos = x.apply(Op.EQ, [v, scalar(x, math.inf, v.dtype)])
    neg = x.apply(Op.EQ, [v, scalar(x, -math.inf, v.dtype)])
    want_pos, want_neg = x.attr_int("detect_positive", 1), x.attr_int("detect_negative", 1)
    if want_pos and want_neg:
        return x.apply(Op.OR, [pos, neg])
    if want_pos:
        return pos
    if want_neg:
        return neg
    return x.apply(Op.AND, [pos, neg])  # all false


@rule("Clip")
def _clip(x: NodeCtx):
    v = x.val(0)
    if x.has(1):
        v = x.apply(Op.MAXIMUM, [v, x.val(1)])
    if x.has(2):
        v = x.apply(Op.MINIMUM, [v, x.val(2)])
    return v


@rule("Gelu")
def _gelu(x: NodeCtx):
    approx = x.attr_str("approximate", "none")
    if approx not in ("none", "tanh"):
        raise LLMCError(f"unknown approximate={approx!r}")
    return x.apply(Op.GELU, [x.val(0)], GeluAttrs(approximate=approx == "tanh"))


@rule("Softmax", "LogSoftmax")
def _softmax(x: NodeCtx):
    v = x.val(0)
    out = x.apply(Op.SOFTMAX, [v], AxisAttrs(norm_axis(x.attr_int("axis", -1), v.rank)))
    return x.apply(Op.LOG, [out]) if x.op_type == "LogSoftmax" else out


# ---- linear algebra -----------------------------------------------------------------------
@rule("MatMul")
def _matmul(x: NodeCtx):
    a, b = x.val(0), x.val(1)
    if a.rank == 0 or b.rank == 0:
        raise LLMCError("MatMul operands must have rank >= 1")
    a2 = reshape(x, a, (1,) + a.shape) if a.rank == 1 else a
    b2 = reshape(x, b, b.shape + (1,)) if b.rank == 1 else b
    out = x.apply(Op.MATMUL, [a2, b2])
    shape = out.shape
    if a.rank == 1:
        shape = shape[:-2] + shape[-1:]
    if b.rank == 1:
        shape = shape[:-1]
    return reshape(x, out, shape)


@rule("Gemm")
def _gemm(x: NodeCtx):
    a, b = x.val(0), x.val(1)
    if a.rank != 2 or b.rank != 2:
        raise LLMCError(f"Gemm takes 2-D operands, got ranks {a.rank} and {b.rank}")
    if x.attr_int("transA", 0):
        a = permute(x, a, (1, 0))
    if x.attr_int("transB", 0):
        b = permute(x, b, (1, 0))
    y = x.apply(Op.MATMUL, [a, b])
    alpha, beta = x.attr_float("alpha", 1.0), x.attr_float("beta", 1.0)
    if alpha != 1.0:
        y = x.apply(Op.MUL, [y, scalar(x, alpha, y.dtype)])
    if x.has(2) and beta != 0.0:
        c = x.val(2)
        if beta != 1.0:
            c = x.apply(Op.MUL, [c, scalar(x, beta, c.dtype)])
        y = x.apply(Op.ADD, [y, c])
    return y


# ---- normalization and reductions ---------------------------------------------------------
@rule("LayerNormalization")
def _layer_norm(x: NodeCtx):
    v, w = x.val(0), x.val(1)
    b = x.val(2) if x.has(2) else None
    axis = norm_axis(x.attr_int("axis", -1), v.rank)
    eps = x.attr_float("epsilon", 1e-5)
    last = (v.shape[-1],)
    if len(x.proto.output) > 1 and any(x.proto.output[1:]):
        return _layer_norm_parts(x, v, w, b, axis, eps)
    if axis == v.rank - 1 and w.shape == last and (b is None or b.shape == last):
        if b is None:
            b = x.apply(Op.EXPAND, [scalar(x, 0, w.dtype)], ShapeAttrs(last))
        return x.apply(Op.LAYER_NORM, [v, w, b], NormAttrs(eps))
    return _layer_norm_parts(x, v, w, b, axis, eps)[0]


def _layer_norm_parts(x: NodeCtx, v: Val, w: Val, b: Val | None, axis: int, eps: float) -> list[Val]:
    axes = tuple(range(axis, v.rank))
    mean = x.apply(Op.MEAN, [v], ReduceAttrs(axes, True))
    d = x.apply(Op.SUB, [v, mean])
    var = x.apply(Op.MEAN, [x.apply(Op.MUL, [d, d])], ReduceAttrs(axes, True))
    inv = x.apply(Op.RSQRT, [x.apply(Op.ADD, [var, scalar(x, eps, var.dtype)])])
    y = x.apply(Op.MUL, [x.apply(Op.MUL, [d, inv]), w])
    if b is not None:
        y = x.apply(Op.ADD, [y, b])
    return [y, mean, inv]


@rule("RMSNormalization")
def _rms_norm(x: NodeCtx):
    v, w = x.val(0), x.val(1)
    axis = norm_axis(x.attr_int("axis", -1), v.rank)
    eps = x.attr_float("epsilon", 1e-5)
    if axis == v.rank - 1 and w.shape == (v.shape[-1],):
        return x.apply(Op.RMS_NORM, [v, w], NormAttrs(eps))
    axes = tuple(range(axis, v.rank))
    ms = x.apply(Op.MEAN, [x.apply(Op.MUL, [v, v])], ReduceAttrs(axes, True))
    inv = x.apply(Op.RSQRT, [x.apply(Op.ADD, [ms, scalar(x, eps, ms.dtype)])])
    return x.apply(Op.MUL, [x.apply(Op.MUL, [v, inv]), w])


_REDUCE = {"ReduceMean": Op.MEAN, "ReduceSum": Op.SUM, "ReduceMax": Op.MAX, "ReduceMin": Op.MIN,
           "ReduceSumSquare": Op.SUM, "ReduceL2": Op.SUM, "ReduceL1": Op.SUM, "ReduceProd": None}


@rule(*_REDUCE)
def _reduce(x: NodeCtx):
    v = x.val(0)
    axes = x.ints(1) if x.has(1) else x.attr_ints("axes", [])
    keep = bool(x.attr_int("keepdims", 1))
    if not axes:
        if x.attr_int("noop_with_empty_axes", 0) or v.rank == 0:
            return v
        axes = range(v.rank)
    attrs = ReduceAttrs(tuple(sorted(norm_axes(axes, v.rank))), keep)
    t = x.op_type
    if t == "ReduceProd":
        if v.known is None:
            raise UnsupportedOpError("ReduceProd is only supported on values known at import time")
        prod = v.known.prod(axis=attrs.axes, keepdims=keep)
        return Val.const(prod, v.dtype) if K.has_symbols(v.known) else x.const(prod.astype(v.dtype.numpy), v.dtype)
    if t in ("ReduceSumSquare", "ReduceL2"):
        v = x.apply(Op.MUL, [v, v])
    elif t == "ReduceL1":
        v = x.apply(Op.ABS, [v])
    out = x.apply(_REDUCE[t], [v], attrs)
    return x.apply(Op.SQRT, [out]) if t == "ReduceL2" else out


@rule("CumSum")
def _cumsum(x: NodeCtx):
    v = x.val(0)
    axis = norm_axis(x.int_scalar(1), v.rank)
    reverse = bool(x.attr_int("reverse", 0))
    if reverse:
        v = _flip(x, v, axis)
    out = cast(x, x.apply(Op.CUMSUM, [v], AxisAttrs(axis)), v.dtype)
    if x.attr_int("exclusive", 0):
        out = x.apply(Op.SUB, [out, v])
    return _flip(x, out, axis) if reverse else out


def _flip(x: NodeCtx, v: Val, axis: int) -> Val:
    d = v.shape[axis]
    if not isinstance(d, int) or d > K.FOLD_LIMIT:
        raise UnsupportedOpError(f"reversing an axis of size {d} is not supported")
    return x.apply(Op.TAKE, [v, x.const(np.arange(d - 1, -1, -1, dtype=np.int64), DType.I64)], AxisAttrs(axis))


from . import onnx_rules_attention, onnx_rules_nn, onnx_rules_seq, onnx_rules_shape  # noqa: E402,F401  (register more rules)
