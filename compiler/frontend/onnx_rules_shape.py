"""ONNX data movement, indexing and shape-arithmetic rules (registered into `onnx_rules.RULES`).

Targets such as Reshape's shape or Slice's bounds must be known at import time; they
may hold symbolic dims (from `Shape` of an activation), which the IR carries in attrs.
"""
from __future__ import annotations

import numpy as np

from ...errors import LLMCError, UnsupportedOpError
from ..dtypes import DType
from ..ops import ArangeAttrs, AxisAttrs, FullAttrs, Op, ShapeAttrs, SliceAttrs
from ..symbolic import Dim, exact_div
from . import onnx_known as K
from .onnx_context import NodeCtx, Val, py_scalar
from .onnx_rules import norm_axes, norm_axis, numel, permute, reshape, rule, scalar

BIG = 1 << 62  # slice ends at or beyond this mean "to the end" (exporters write INT64_MAX)


def _static_dims(dims, what: str) -> None:
    for d in dims:
        if isinstance(d, int) and d < 0:
            raise LLMCError(f"{what} has a negative dim: {list(dims)}")


# ---- sources ------------------------------------------------------------------------------
@rule("Constant")
def _constant(x: NodeCtx):
    if len(x.attrs) != 1:
        raise LLMCError(f"needs exactly one value attribute, got {sorted(x.attrs)}")
    name = next(iter(x.attrs))
    if name == "value":
        arr, dtype = x.attr_tensor("value")
        return Val(dtype, known=arr)
    if name == "value_float":
        return scalar(x, x.attr_float(name), DType.F32)
    if name == "value_floats":
        return x.const(np.array(x.attr_floats(name), np.float32), DType.F32)
    if name == "value_int":
        return scalar(x, x.attr_int(name), DType.I64)
    if name == "value_ints":
        return x.const(np.array(x.attr_ints(name), np.int64), DType.I64)
    raise UnsupportedOpError(f"Constant with attribute {name!r} is not supported")


@rule("ConstantOfShape")
def _constant_of_shape(x: NodeCtx):
    shape = tuple(x.dims(0))
    _static_dims(shape, "ConstantOfShape")
    a = x.attrs.get("value")
    arr, dtype = x.attr_tensor("value") if a is not None else (np.zeros(1, np.float32), DType.F32)
    if arr.size != 1:
        raise LLMCError("attribute 'value' must hold one element")
    value = arr.reshape(-1)[0]
    if K.small(shape):
        return x.const(np.full(shape, value, dtype=dtype.numpy), dtype)
    return x.source(Op.FULL, FullAttrs(shape, py_scalar(value), dtype))


@rule("Range")
def _range(x: NodeCtx):
    start, limit, delta = x.scalar(0), x.scalar(1), x.scalar(2)
    dtype = x.val(0).dtype
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)):
        if delta == 0 or not all(np.isfinite([start, limit, delta])):
            raise LLMCError(f"bad Range({start}, {limit}, {delta})")
        n = max(int(np.ceil((limit - start) / delta)), 0)
        if n <= K.FOLD_LIMIT:
            return x.const(start + np.arange(n, dtype=np.float64 if dtype.is_float else np.int64) * delta, dtype)
    try:
        start, limit, delta = (K.as_dim(v) for v in (start, limit, delta))
    except K.Unfoldable:
        raise UnsupportedOpError(f"Range({start}, {limit}, {delta}) with non-integer bounds") from None
    if not isinstance(delta, int) or delta == 0 or (delta != 1 and not isinstance(limit - start, int)):
        raise UnsupportedOpError(f"Range({start}, {limit}, {delta}): a symbolic range needs step 1")
    return x.source(Op.ARANGE, ArangeAttrs(start, limit, delta, dtype))


@rule("Shape")
def _shape(x: NodeCtx):
    shape = x.val(0).shape
    r = len(shape)
    start, end = x.attr_int("start", 0), x.attr_int("end", r)
    start, end = (min(max(i + r if i < 0 else i, 0), r) for i in (start, end))
    return Val.const(_dim_array(shape[start:end]), DType.I64)


@rule("Size")
def _size(x: NodeCtx):
    return Val.const(_dim_array([numel(x.val(0).shape)]).reshape(()), DType.I64)


def _dim_array(dims) -> np.ndarray:
    out = np.empty(len(dims), dtype=object)
    out[:] = list(dims)
    return out


@rule("Trilu")
def _trilu(x: NodeCtx):
    v = x.val(0)
    if v.rank < 2:
        raise LLMCError("Trilu needs rank >= 2")
    k = x.int_scalar(1) if x.has(1) else 0
    rows, cols = v.shape[-2], v.shape[-1]
    r = reshape(x, _arange(x, rows), (rows, 1))
    c = reshape(x, _arange(x, cols), (1, cols))
    diff = x.apply(Op.SUB, [c, r])
    keep = x.apply(Op.GE if x.attr_int("upper", 1) else Op.LE, [diff, scalar(x, k, DType.I64)])
    return x.apply(Op.WHERE, [keep, v, scalar(x, 0, v.dtype)])


def _arange(x: NodeCtx, n: Dim) -> Val:
    if isinstance(n, int) and n <= K.FOLD_LIMIT:
        return x.const(np.arange(n, dtype=np.int64), DType.I64)
    return x.source(Op.ARANGE, ArangeAttrs(0, n, 1, DType.I64))


# ---- indexing -----------------------------------------------------------------------------
@rule("Gather")
def _gather(x: NodeCtx):
    data, idx = x.val(0), x.val(1)
    axis = norm_axis(x.attr_int("axis", 0), data.rank)
    idx = _checked_indices(x, idx, data.shape[axis])
    return x.apply(Op.TAKE, [data, idx], AxisAttrs(axis))


def _checked_indices(x: NodeCtx, idx: Val, dim: Dim) -> Val:
    """Known indices made non-negative and range-checked against a static dim."""
    if not idx.dtype.is_int:
        raise LLMCError(f"indices must be integers, got {idx.dtype.value}")
    if idx.known is None or K.has_symbols(idx.known) or not isinstance(dim, int):
        return idx
    k = idx.known.astype(np.int64)
    if k.size and (k.min() < -dim or k.max() >= dim):
        raise LLMCError(f"index out of range [{-dim}, {dim}): {k.reshape(-1)[:8].tolist()}")
    return x.const(np.where(k < 0, k + dim, k), DType.I64) if (k < 0).any() else idx


@rule("GatherElements")
def _gather_elements(x: NodeCtx):
    data, idx = x.val(0), x.val(1)
    axis = norm_axis(x.attr_int("axis", 0), data.rank)
    idx = _checked_indices(x, idx, data.shape[axis])
    if idx.rank != data.rank:
        raise LLMCError(f"indices rank {idx.rank} differs from data rank {data.rank}")
    # Off the axis, indices may be shorter than the data; the IR's gather (numpy
    # take_along_axis) would broadcast them, so cut the data down to the indices first.
    for a, (dd, di) in enumerate(zip(data.shape, idx.shape)):
        if a != axis and dd != di:
            if not _provably(x, Op.LE, di, dd):
                raise LLMCError(f"indices shape {list(idx.shape)} does not fit data {list(data.shape)}")
            data = x.apply(Op.SLICE, [data], SliceAttrs(a, 0, di))
    return x.apply(Op.GATHER, [data, idx], AxisAttrs(axis))


@rule("GatherND")
def _gather_nd(x: NodeCtx):
    data, idx = x.val(0), x.val(1)
    if x.attr_int("batch_dims", 0) != 0:
        raise UnsupportedOpError("GatherND with batch_dims != 0 is not supported")
    if idx.rank < 1 or not isinstance(idx.shape[-1], int) or not 1 <= idx.shape[-1] <= data.rank:
        raise LLMCError(f"bad GatherND indices shape {list(idx.shape)} for data of rank {data.rank}")
    if not idx.dtype.is_int:
        raise LLMCError(f"indices must be integers, got {idx.dtype.value}")
    last = idx.rank - 1
    parts = [_checked_indices(x, reshape(x, x.apply(Op.SLICE, [idx], SliceAttrs(last, j, j + 1)), idx.shape[:-1]),
                              data.shape[j])
             for j in range(idx.shape[-1])]
    return x.apply(Op.INDEX, [data, *parts])


# ---- slicing and joining ------------------------------------------------------------------
@rule("Slice")
def _slice(x: NodeCtx):
    v = x.val(0)
    starts, ends = x.dims(1), x.dims(2)
    axes = x.ints(3) if x.has(3) else list(range(len(starts)))
    steps = x.ints(4) if x.has(4) else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise LLMCError(f"starts/ends/axes/steps lengths differ: {starts} {ends} {axes} {steps}")
    for axis, s, e, st in zip(norm_axes(axes, v.rank), starts, ends, steps):
        v = _slice_axis(x, v, axis, s, e, st)
    return v


def _slice_axis(x: NodeCtx, v: Val, axis: int, start: Dim, end: Dim, step: int) -> Val:
    dim = v.shape[axis]
    if step == 0:
        raise LLMCError("slice step 0")
    if isinstance(dim, int) and isinstance(start, int) and isinstance(end, int):
        start, end, step = slice(start, end, step).indices(dim)
        if step < 0:
            if dim > K.FOLD_LIMIT:
                raise UnsupportedOpError(f"a negative-step slice of an axis of size {dim} is not supported")
            idx = np.arange(start, end, step, dtype=np.int64)
            return x.apply(Op.TAKE, [v, x.const(idx, DType.I64)], AxisAttrs(axis))
        end = max(end, start)
    else:
        if step < 0:
            raise UnsupportedOpError("a negative-step slice of a symbolic extent is not supported")
        start, end = _clamp(x, start, dim), _clamp(x, end, dim)
    if start == 0 and end == dim and step == 1:
        return v
    return x.apply(Op.SLICE, [v], SliceAttrs(axis, start, end, step))


def _provably(x: NodeCtx, op: Op, a: Dim, b: Dim) -> bool:
    """Whether `a op b` holds for every value of the symbols (False when undecidable)."""
    try:
        return K.compare(op, a, b, x.symbols())
    except K.Unfoldable:
        return False


def _clamp(x: NodeCtx, i: Dim, dim: Dim) -> Dim:
    """An ONNX slice bound resolved against a symbolic dim.

    ONNX clamps bounds to [0, dim]. A constant bound must provably be in range or out of it
    over the dim's bounds; a symbolic one (`seq - 1`) is trusted to be in range unless
    provably not, since exporters derive those from the same dims.
    """
    if isinstance(i, int) and i >= BIG:
        return dim
    constant = isinstance(i, int)
    if constant and i < 0:
        i = dim + i
    if _provably(x, Op.LE, i, 0):
        return 0
    if _provably(x, Op.GE, i, dim):
        return dim
    if constant and not (_provably(x, Op.GE, i, 0) and _provably(x, Op.LE, i, dim)):
        raise LLMCError(f"slice bound {i} may fall outside [0, {dim}] for some values of the dim's "
                        f"bounds {list(K.dim_range(dim, x.symbols()))}; narrow them with dim_bounds")
    return i


@rule("Concat")
def _concat(x: NodeCtx):
    vals = x.vals()
    if not vals:
        raise LLMCError("Concat needs inputs")
    if len({v.rank for v in vals}) != 1:
        raise LLMCError(f"Concat inputs have different ranks {[v.rank for v in vals]}")
    axis = norm_axis(x.attr_int("axis", 0), vals[0].rank)
    vals = [v for v in vals if v.shape[axis] != 0] or vals[:1]
    return vals[0] if len(vals) == 1 else x.apply(Op.CONCAT, vals, AxisAttrs(axis))


@rule("Split")
def _split(x: NodeCtx):
    v = x.val(0)
    axis = norm_axis(x.attr_int("axis", 0), v.rank)
    n = len(x.proto.output)
    dim = v.shape[axis]
    if x.has(1):
        sizes: list[Dim] = x.dims(1)
    elif x.attr_ints("split") is not None:
        sizes = x.attr_ints("split")
    else:
        parts = x.attr_int("num_outputs", n)
        if parts != n:
            raise LLMCError(f"num_outputs {parts} differs from the {n} outputs")
        if isinstance(dim, int):
            chunk = -(-dim // parts)
            sizes = [min(chunk, max(dim - i * chunk, 0)) for i in range(parts)]
        else:
            sizes = [K.as_dim(_exact_div(dim, parts))] * parts
    if len(sizes) != n:
        raise LLMCError(f"{len(sizes)} split sizes for {n} outputs")
    _static_dims(sizes, "split sizes")
    if sum(sizes) != dim:
        raise LLMCError(f"split sizes {sizes} do not add up to dim {dim}")
    outs, start = [], 0
    for s in sizes:
        outs.append(x.apply(Op.SLICE, [v], SliceAttrs(axis, start, start + s)))
        start = start + s
    return outs


def _exact_div(d: Dim, n: int) -> Dim:
    if isinstance(d, int):
        return d // n
    q = exact_div(d, n)
    if q is None:
        raise LLMCError(f"cannot split symbolic dim {d} into {n} equal parts")
    return q


# ---- reshaping ----------------------------------------------------------------------------
@rule("Reshape")
def _reshape(x: NodeCtx):
    v = x.val(0)
    target = x.dims(1)
    allowzero = x.attr_int("allowzero", 0)
    out: list[Dim] = []
    infer_at = None
    for i, d in enumerate(target):
        if isinstance(d, int) and d == 0 and not allowzero:
            if i >= v.rank:
                raise LLMCError(f"reshape target {target}: 0 at position {i} copies no input dim")
            d = v.shape[i]
        elif isinstance(d, int) and d == -1:
            if infer_at is not None:
                raise LLMCError(f"reshape target {target} has more than one -1")
            infer_at = i
        elif isinstance(d, int) and d < 0:
            raise LLMCError(f"reshape target {target} has a negative dim")
        out.append(d)
    if infer_at is not None:
        rest = numel(out[:infer_at] + out[infer_at + 1:])
        out[infer_at] = _infer_dim(numel(v.shape), rest, target)
    return reshape(x, v, out)


def _infer_dim(total: Dim, rest: Dim, target) -> Dim:
    if isinstance(rest, int) and rest == 0:
        raise LLMCError(f"reshape target {target}: cannot infer -1 next to a zero dim")
    if isinstance(total, int) and isinstance(rest, int):
        if total % rest:
            raise LLMCError(f"reshape target {target} does not divide {total} elements")
        return total // rest
    q = exact_div(total, rest)
    if q is None:
        raise LLMCError(f"reshape target {target}: cannot infer -1 from {total} / {rest}")
    return q


@rule("Flatten")
def _flatten(x: NodeCtx):
    v = x.val(0)
    axis = x.attr_int("axis", 1)
    if not -v.rank <= axis <= v.rank:
        raise LLMCError(f"axis {axis} out of range for rank {v.rank}")
    if axis < 0:
        axis += v.rank
    return reshape(x, v, (numel(v.shape[:axis]), numel(v.shape[axis:])))


@rule("Unsqueeze")
def _unsqueeze(x: NodeCtx):
    v = x.val(0)
    axes = x.ints(1) if x.has(1) else x.attr_ints("axes", [])
    rank = v.rank + len(axes)
    axes = set(norm_axes(axes, rank))
    it = iter(v.shape)
    return reshape(x, v, [1 if i in axes else next(it) for i in range(rank)])


@rule("Squeeze")
def _squeeze(x: NodeCtx):
    v = x.val(0)
    axes = x.ints(1) if x.has(1) else x.attr_ints("axes")
    if axes is None:
        axes = [i for i, d in enumerate(v.shape) if isinstance(d, int) and d == 1]
    axes = set(norm_axes(axes, v.rank))
    for a in axes:
        if not (isinstance(v.shape[a], int) and v.shape[a] == 1):
            raise LLMCError(f"cannot squeeze axis {a} of size {v.shape[a]}")
    return reshape(x, v, [d for i, d in enumerate(v.shape) if i not in axes])


@rule("Transpose")
def _transpose(x: NodeCtx):
    v = x.val(0)
    perm = x.attr_ints("perm", list(range(v.rank))[::-1])
    if sorted(perm) != list(range(v.rank)):
        raise LLMCError(f"perm {perm} is not a permutation of rank {v.rank}")
    return permute(x, v, perm)


@rule("Expand")
def _expand(x: NodeCtx):
    v = x.val(0)
    target = x.dims(1)
    _static_dims(target, "Expand shape")
    r = max(v.rank, len(target))
    a = [1] * (r - v.rank) + list(v.shape)
    b = [1] * (r - len(target)) + list(target)
    out = []
    for da, db in zip(a, b):
        if _is_one(da) or da == db:
            out.append(db)
        elif _is_one(db):
            out.append(da)
        else:
            raise LLMCError(f"cannot expand {list(v.shape)} to {target}")
    if tuple(out) == tuple(v.shape):
        return v
    return x.apply(Op.EXPAND, [v], ShapeAttrs(tuple(out)))


def _is_one(d: Dim) -> bool:
    return isinstance(d, int) and d == 1


@rule("Tile")
def _tile(x: NodeCtx):
    v = x.val(0)
    reps = x.ints(1)
    if len(reps) != v.rank or any(r < 0 for r in reps):
        raise LLMCError(f"repeats {reps} do not fit rank {v.rank}")
    if all(r == 1 for r in reps):
        return v
    # [d0, d1] -> [1, d0, 1, d1] -> [r0, d0, r1, d1] -> [r0*d0, r1*d1]
    inter = [d for dim in v.shape for d in (1, dim)]
    wide = [d for r, dim in zip(reps, v.shape) for d in (r, dim)]
    e = x.apply(Op.EXPAND, [reshape(x, v, inter)], ShapeAttrs(tuple(wide)))
    return reshape(x, e, [r * d for r, d in zip(reps, v.shape)])

