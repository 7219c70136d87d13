"""Compile-time values of the ONNX frontend: constant folding, including symbolic shapes.

A tensor whose value the importer can compute is kept as a numpy array (its "known"
value) instead of an IR node. Shape arithmetic makes this essential: `Shape(x)` of an
activation with symbolic dims is an object array of dims (python ints and `SymExpr`s),
and Gather/Concat/Mul/... on it are evaluated here, so a Reshape target ends up a tuple
of dims rather than a runtime tensor. Object arrays always hold exact integers (also
when their tag dtype is float, as after `Cast(Shape(x)[1], float)`).

Folding a concrete array reuses the IR's own numpy reference semantics, so a folded
value is exactly what the interpreter would have computed at run time.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Mapping, Sequence

import numpy as np

from ...errors import LLMCError
from ..dtypes import DType
from ..ir import TensorType
from ..ops import BINARY, Op
from ..reference import REFERENCE, run_op
from ..symbolic import Dim, SymDim, SymExpr, exact_div

FOLD_LIMIT = 1 << 16  # largest folded result, in elements: bigger ones stay runtime ops
SYMBOLIC_LIMIT = 256  # largest folded result holding symbolic dims (shape vectors are short)


def small(shape) -> bool:
    """Whether a static shape is small enough to fold (zero dims do not excuse huge ones)."""
    return all(isinstance(d, int) for d in shape) and math.prod(max(d, 1) for d in shape) <= FOLD_LIMIT


class Unfoldable(Exception):
    """This value cannot be computed at import time; emit an IR op instead."""


# ---- dims ---------------------------------------------------------------------------------
def as_dim(x: object) -> Dim:
    """A python int or SymExpr from a known-array element (numpy scalars, integral floats)."""
    if isinstance(x, SymExpr):
        return x
    if isinstance(x, (bool, np.bool_)):
        return int(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return int(x)
    raise Unfoldable(f"{x!r} is not an integer")


def dim_range(d: Dim, symbols: Mapping[str, SymDim]) -> tuple[int, int]:
    """Inclusive [lo, hi] of a dim over the symbols' bounds (interval arithmetic; bounds are >= 0)."""
    if isinstance(d, int):
        return d, d
    lo = hi = 0
    for mono, c in d.terms:
        mlo = mhi = 1
        for s in mono:
            b = symbols.get(s)
            if b is None:
                raise Unfoldable(f"unknown symbol {s}")
            mlo, mhi = mlo * b.lo, mhi * b.hi
        lo, hi = (lo + c * mlo, hi + c * mhi) if c > 0 else (lo + c * mhi, hi + c * mlo)
    return lo, hi


_CMP = {Op.EQ: operator.eq, Op.NE: operator.ne, Op.LT: operator.lt, Op.LE: operator.le,
        Op.GT: operator.gt, Op.GE: operator.ge}


def compare(op: Op, a: Dim, b: Dim, symbols: Mapping[str, SymDim]) -> bool:
    """Decide `a op b` for all values of the symbols, or raise Unfoldable."""
    lo, hi = dim_range(a - b, symbols)
    if lo == hi:
        return _CMP[op](lo, 0)
    outcomes = {_CMP[op](lo, 0), _CMP[op](hi, 0)}
    if op in (Op.EQ, Op.NE) and lo <= 0 <= hi:
        raise Unfoldable(f"cannot decide {a} {op.name} {b}")
    if len(outcomes) != 1:
        raise Unfoldable(f"cannot decide {a} {op.name} {b}")
    return outcomes.pop()


def _trunc_div(a: Dim, b: Dim, is_int: bool) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            raise Unfoldable("division by zero")
        if is_int:
            q = abs(a) // abs(b)
            return q if (a >= 0) == (b >= 0) else -q
        if a % b:
            raise Unfoldable("inexact division")
        return a // b
    if b == 0:
        raise Unfoldable("division by zero")
    q = exact_div(a, b)  # exact symbolic division only: (b*s) // s, (64*s) // 16
    if q is None:
        raise Unfoldable(f"inexact symbolic division {a} / {b}")
    return q


# ---- known arrays -------------------------------------------------------------------------
def has_symbols(a: np.ndarray) -> bool:
    return a.dtype == object


def normalize(a: np.ndarray, dtype: DType) -> np.ndarray:
    """Canonical known array: object arrays hold python ints / SymExprs, or become plain numpy."""
    a = np.asarray(a)
    if a.dtype != object:
        return a.astype(dtype.numpy, copy=False)
    flat = [as_dim(e) for e in a.reshape(-1)]
    if not any(isinstance(e, SymExpr) for e in flat):
        return np.array(flat, dtype=dtype.numpy).reshape(a.shape)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(a.shape)


def to_object(a: np.ndarray) -> np.ndarray:
    if a.dtype == object:
        return a
    if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise Unfoldable("non-integral values mixed with symbolic dims")
    out = np.empty(a.size, dtype=object)
    out[:] = [as_dim(e) for e in a.reshape(-1).tolist()]
    return out.reshape(a.shape)


def dims_of(a: np.ndarray) -> list[Dim]:
    return [as_dim(e) for e in np.asarray(a).reshape(-1)]


# Ops that only move elements around: numpy runs them on object arrays unchanged.
_STRUCTURAL = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.CONCAT, Op.TAKE, Op.INDEX,
                         Op.GATHER, Op.WHERE})


def _symbolic_attrs(attrs) -> bool:
    for f in dataclasses.fields(attrs):
        v = getattr(attrs, f.name)
        if isinstance(v, SymExpr) or (isinstance(v, tuple) and any(isinstance(e, SymExpr) for e in v)):
            return True
    return False


def fold(op: Op, attrs, arrays: Sequence[np.ndarray], out: TensorType,
         symbols: Mapping[str, SymDim]) -> np.ndarray:
    """The value of `op` on known inputs, or Unfoldable."""
    if not all(isinstance(d, int) for d in out.shape) or _symbolic_attrs(attrs):
        raise Unfoldable("symbolic result shape or attributes")
    if not small(out.shape):
        raise Unfoldable("result too large to fold")
    symbolic = any(has_symbols(a) for a in arrays)
    if symbolic and math.prod(out.shape) > SYMBOLIC_LIMIT:
        raise Unfoldable("symbolic result too large to fold")
    try:
        with np.errstate(all="ignore"):
            if not symbolic:
                return run_op(op, attrs, list(arrays), {}, out.dtype)
            return normalize(_fold_symbolic(op, attrs, arrays, out, symbols), out.dtype)
    except (IndexError, ValueError, TypeError, ArithmeticError) as e:  # an index out of range, bool - bool
        raise LLMCError(f"cannot evaluate {op.name} on constants: {e}") from e


def _fold_symbolic(op: Op, attrs, arrays, out: TensorType, symbols) -> np.ndarray:
    if op is Op.WHERE:
        if has_symbols(arrays[0]):
            raise Unfoldable("symbolic condition")
        return np.where(arrays[0], to_object(arrays[1]), to_object(arrays[2]))
    if op in (Op.TAKE, Op.GATHER, Op.INDEX):  # symbolic data, concrete indices
        if any(has_symbols(a) for a in arrays[1:]):
            raise Unfoldable("symbolic indices")
        return REFERENCE[op](attrs, to_object(arrays[0]), *arrays[1:], env={})
    if op in _STRUCTURAL:
        return REFERENCE[op](attrs, *[to_object(a) for a in arrays], env={})
    return _fold_arithmetic(op, attrs, arrays, out, symbols)


def _fold_arithmetic(op: Op, attrs, arrays, out: TensorType, symbols) -> np.ndarray:
    objs = [to_object(a) for a in arrays]
    is_int = out.dtype.is_int
    if op in BINARY:
        a, b = np.broadcast_arrays(*objs)
        fn = _binary_fn(op, is_int, symbols)
        res = np.empty(a.shape, dtype=object)
        for idx in np.ndindex(a.shape):
            res[idx] = fn(a[idx], b[idx])
        return res
    if op is Op.NEG:
        return _elementwise(operator.neg, objs[0])
    if op is Op.CAST:
        if out.dtype is DType.BOOL:
            return _elementwise(lambda e: compare(Op.NE, e, 0, symbols), objs[0]).astype(bool)
        if out.dtype.is_int or out.dtype.is_float:
            return objs[0]
    if op is Op.SUM:
        return objs[0].sum(axis=attrs.axes, keepdims=attrs.keepdims)
    raise Unfoldable(f"{op.name} of symbolic values")


def _elementwise(fn, a: np.ndarray) -> np.ndarray:
    return np.asarray(np.frompyfunc(fn, 1, 1)(a), dtype=object)  # frompyfunc unwraps 0-d results


def _binary_fn(op: Op, is_int: bool, symbols):
    if op is Op.ADD:
        return operator.add
    if op is Op.SUB:
        return operator.sub
    if op is Op.MUL:
        return operator.mul
    if op is Op.DIV:
        return lambda a, b: _trunc_div(a, b, is_int)
    if op in _CMP:
        return lambda a, b: compare(op, a, b, symbols)
    if op is Op.MAXIMUM:
        return lambda a, b: a if compare(Op.GE, a, b, symbols) else b
    if op is Op.MINIMUM:
        return lambda a, b: a if compare(Op.LE, a, b, symbols) else b
    raise Unfoldable(f"{op.name} of symbolic values")
