"""Shape and dtype inference: one rule per op, keyed by `Op`."""
from __future__ import annotations

from typing import Callable, Sequence

from .dtypes import DType, promote
from .ir import TensorType
from .ops import BINARY, COMPARE, REDUCE, UNARY, Op
from .symbolic import Dim
from ..runtime.engine.kv_codec import SCALE_BYTES as KV_SCALE_BYTES


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        non1 = {d for d in dims if d != 1}
        if len(non1) > 1:
            raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast (dim {i}: {non1})")
        out.append(non1.pop() if non1 else 1)
    return tuple(out)


def _unary(attrs, t: TensorType) -> TensorType:
    return t


def _cast(attrs, t: TensorType) -> TensorType:
    return TensorType(t.shape, attrs.dtype)


def _binary(op: Op):
    def rule(attrs, a: TensorType, b: TensorType) -> TensorType:
        shape = broadcast_shapes(a.shape, b.shape)
        return TensorType(shape, DType.BOOL if op in COMPARE else promote(a.dtype, b.dtype))
    return rule


def _where(attrs, c: TensorType, a: TensorType, b: TensorType) -> TensorType:
    if c.dtype is not DType.BOOL:
        raise ValueError(f"where condition must be bool, got {c.dtype.value}")
    return TensorType(broadcast_shapes(c.shape, a.shape, b.shape), promote(a.dtype, b.dtype))


def _reduce(attrs, t: TensorType) -> TensorType:
    for a in attrs.axes:
        if not 0 <= a < t.rank:
            raise ValueError(f"reduce axis {a} out of range for rank {t.rank}")
    if attrs.keepdims:
        shape = tuple(1 if i in attrs.axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in attrs.axes)
    return TensorType(shape, t.dtype)


def _axis_same(attrs, t: TensorType) -> TensorType:
    if not 0 <= attrs.axis < t.rank:
        raise ValueError(f"axis {attrs.axis} out of range for rank {t.rank}")
    return t


def _cumsum(attrs, t: TensorType) -> TensorType:
    _axis_same(attrs, t)
    return TensorType(t.shape, DType.I64 if t.dtype in (DType.BOOL, DType.I32, DType.I8, DType.U8) else t.dtype)


def _numel(shape: Sequence[Dim]) -> Dim:
    n: Dim = 1
    for d in shape:
        n = d * n
    return n


def _reshape(attrs, t: TensorType) -> TensorType:
    if _numel(attrs.shape) != _numel(t.shape):
        raise ValueError(f"reshape {tuple(t.shape)} -> {tuple(attrs.shape)} changes the element count")
    return TensorType(tuple(attrs.shape), t.dtype)


def _permute(attrs, t: TensorType) -> TensorType:
    if sorted(attrs.perm) != list(range(t.rank)):
        raise ValueError(f"permutation {attrs.perm} is not one of rank {t.rank}")
    return TensorType(tuple(t.shape[p] for p in attrs.perm), t.dtype)


def _expand(attrs, t: TensorType) -> TensorType:
    shape = tuple(attrs.shape)
    if broadcast_shapes(t.shape, shape) != shape:
        raise ValueError(f"cannot expand {tuple(t.shape)} to {shape}")
    return TensorType(shape, t.dtype)


def _slice(attrs, t: TensorType) -> TensorType:
    if not 0 <= attrs.axis < t.rank or attrs.step < 1:
        raise ValueError(f"bad slice axis {attrs.axis} / step {attrs.step} for rank {t.rank}")
    length = attrs.end - attrs.start
    if attrs.step != 1:
        if not isinstance(length, int):
            raise ValueError("strided slice of a symbolic extent")
        length = (length + attrs.step - 1) // attrs.step
    shape = list(t.shape)
    shape[attrs.axis] = length
    return TensorType(tuple(shape), t.dtype)


def _concat(attrs, *ts: TensorType) -> TensorType:
    first = ts[0]
    total: Dim = 0
    for t in ts:
        if t.rank != first.rank or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != attrs.axis):
            raise ValueError(f"concat operands {[str(x) for x in ts]} disagree off axis {attrs.axis}")
        total = t.shape[attrs.axis] + total
    shape = list(first.shape)
    shape[attrs.axis] = total
    return TensorType(tuple(shape), promote_all(ts))


def promote_all(ts: Sequence[TensorType]) -> DType:
    d = ts[0].dtype
    for t in ts[1:]:
        d = promote(d, t.dtype)
    return d


def _take(attrs, x: TensorType, idx: TensorType) -> TensorType:
    if not idx.dtype.is_int:
        raise ValueError(f"indices must be integers, got {idx.dtype.value}")
    a = attrs.axis
    return TensorType(x.shape[:a] + idx.shape + x.shape[a + 1:], x.dtype)


def _index(attrs, x: TensorType, *idx: TensorType) -> TensorType:
    if len(idx) > x.rank or any(not i.dtype.is_int for i in idx):
        raise ValueError("index needs at most rank-many integer index tensors")
    return TensorType(broadcast_shapes(*[i.shape for i in idx]) + x.shape[len(idx):], x.dtype)


def _gather(attrs, x: TensorType, idx: TensorType) -> TensorType:
    if idx.rank != x.rank:
        raise ValueError("gather index must have the input's rank")
    return TensorType(idx.shape, x.dtype)


def _matmul(attrs, a: TensorType, b: TensorType) -> TensorType:
    if a.rank < 2 or b.rank < 2:
        raise ValueError("matmul operands must have rank >= 2 (the frontend adds unit dims)")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul contraction mismatch {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(batch + (a.shape[-2], b.shape[-1]), promote(a.dtype, b.dtype))


def _layer_norm(attrs, x: TensorType, w: TensorType, b: TensorType) -> TensorType:
    if tuple(w.shape) != (x.shape[-1],) or tuple(b.shape) != (x.shape[-1],):
        raise ValueError(f"layer_norm weight/bias {w}/{b} do not match the last dim of {x}")
    return x


def _rms_norm(attrs, x: TensorType, w: TensorType) -> TensorType:
    if tuple(w.shape) != (x.shape[-1],):
        raise ValueError(f"rms_norm weight {w} does not match the last dim of {x}")
    return x


def _attention(attrs, q: TensorType, k: TensorType, v: TensorType, *mask: TensorType) -> TensorType:
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise ValueError("attention takes [batch, heads, seq, head_dim] operands")
    hq, hk = q.shape[1], k.shape[1]
    if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention q/k/v shapes disagree: {q} {k} {v}")
    if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
        raise ValueError(f"query heads {hq} not a multiple of key/value heads {hk}")
    if attrs.has_mask != bool(mask):
        raise ValueError("attention has_mask disagrees with its operands")
    if mask:
        broadcast_shapes(mask[0].shape, q.shape[:3] + (k.shape[2],))
    return TensorType(q.shape[:3] + (v.shape[3],), q.dtype)


def _topk(attrs, x: TensorType) -> TensorType:
    _axis_same(attrs, x)
    n = x.shape[attrs.axis]
    if not isinstance(n, int) or not 1 <= attrs.k <= n:
        raise ValueError(f"top-{attrs.k} needs a static axis of at least k elements, got {x}")
    shape = list(x.shape)
    shape[attrs.axis] = attrs.k
    return TensorType(tuple(shape), DType.I64)


def _routed_matmul(attrs, x: TensorType, w: TensorType, ids: TensorType) -> TensorType:
    if w.rank != 3 or x.rank < 1:
        raise ValueError(f"routed matmul takes x [*, K] and expert weights [E, ., .], got {x} and {w}")
    if not ids.dtype.is_int or tuple(ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"routed matmul ids {ids} must be integers shaped like x {x} without its last dim")
    k, n = (w.shape[2], w.shape[1]) if attrs.weight_nk else (w.shape[1], w.shape[2])
    if x.shape[-1] != k:
        raise ValueError(f"routed matmul contraction mismatch: x {x}, w {w} (weight_nk={attrs.weight_nk})")
    return TensorType(tuple(x.shape[:-1]) + (n,), promote(x.dtype, w.dtype))


def _check_packed(what: str, attrs, k: int, n: int, qw: TensorType, scales: TensorType,
                  zeros: tuple[TensorType, ...]) -> None:
    """A packed weight W [N, K] (compiler/quant_layout.py): qweight, scales and zeros agree."""
    want_q = (DType.U8 if attrs.float8 else DType.I8, k) if attrs.bits == 8 else (DType.U8, k // 2)
    if (qw.dtype, qw.shape[1]) != want_q or (attrs.bits == 4 and k % 2):
        raise ValueError(f"{what}: {attrs.bits}-bit qweight for K={k} must be "
                         f"{want_q[0].value}[{n}, {want_q[1]}], got {qw}")
    if attrs.group < 1 or k % attrs.group:
        raise ValueError(f"{what}: group {attrs.group} does not divide K={k}")
    if tuple(scales.shape) != (n, k // attrs.group) or not scales.dtype.is_float:
        raise ValueError(f"{what}: scales must be float [{n}, {k // attrs.group}], got {scales}")
    if attrs.symmetric == bool(zeros) or (zeros and zeros[0] != scales):
        raise ValueError(f"{what}: zeros {[str(z) for z in zeros]} disagree with symmetric="
                         f"{attrs.symmetric} / scales {scales}")
    if attrs.bits == 8 and not attrs.symmetric:
        raise ValueError(f"{what}: int8 weights are symmetric (no zeros)")


def _qtake(attrs, qw: TensorType, ids: TensorType, scales: TensorType, *zeros: TensorType) -> TensorType:
    if attrs.bits not in (4, 8) or attrs.act_bits or attrs.float8:
        raise ValueError(f"quantized take: weight-only int8 / int4 tables, got bits {attrs.bits}, act_bits "
                         f"{attrs.act_bits}, float8 {attrs.float8}")
    if qw.rank != 2 or scales.rank != 2 or not ids.dtype.is_int:
        raise ValueError(f"quantized take takes qweight [N, .], integer ids, scales [N, .], got {qw}, {ids}, {scales}")
    n, k = qw.shape[0], qw.shape[1] * (2 if attrs.bits == 4 else 1)
    if not isinstance(k, int) or not isinstance(n, int):
        raise ValueError(f"quantized take needs a static table, got {qw}")
    _check_packed("quantized take", attrs, k, n, qw, scales, zeros)
    return TensorType(tuple(ids.shape) + (k,), attrs.out_dtype)


def _qmatmul(attrs, x: TensorType, qw: TensorType, scales: TensorType, *zeros: TensorType) -> TensorType:
    if attrs.act_bits:  # W8A8: the 4th input is the rows' activation scales, not zeros
        if len(zeros) != 1 or tuple(zeros[0].shape) != tuple(x.shape[:-1]) + (1,) or zeros[0].dtype is not x.dtype:
            raise ValueError(f"quantized matmul (act_bits {attrs.act_bits}): the 4th input must be the rows' "
                             f"scales {x.dtype.value}[{', '.join(map(str, x.shape[:-1]))}, 1], got {zeros}")
        act_scales, zeros = zeros[0], ()
    if attrs.bits not in (4, 8):
        raise ValueError(f"quantized matmul: bits must be 4 or 8, got {attrs.bits}")
    if x.rank < 2 or not x.dtype.is_float or qw.rank != 2 or scales.rank != 2:
        raise ValueError(f"quantized matmul takes float x [*, K], qweight [N, .], scales [N, .], got {x}, {qw}, {scales}")
    k, n = x.shape[-1], qw.shape[0]
    if not isinstance(k, int) or not isinstance(n, int):
        raise ValueError(f"quantized matmul needs static K and N, got x {x}, qweight {qw}")
    if attrs.float8 and not (attrs.bits == 8 and attrs.act_bits == 8 and attrs.symmetric):
        raise ValueError("quantized matmul: float8 codes need bits 8, act_bits 8 and no zeros")
    _check_packed("quantized matmul", attrs, k, n, qw, scales, zeros)
    if attrs.act_bits not in (0, 8) or (attrs.act_bits and (attrs.bits != 8 or attrs.group != k)):
        raise ValueError(f"quantized matmul: act_bits {attrs.act_bits} (0, or 8 with per-channel int8 weights)")
    return TensorType(tuple(x.shape[:-1]) + (n,), attrs.out_dtype)


def _paged_attention(attrs, q: TensorType, k: TensorType, v: TensorType, cache: TensorType, table: TensorType,
                     lens: TensorType, starts: TensorType) -> TensorType:
    if q.rank != 4 or k.rank != 4 or v.rank != 4 or q.shape[0] != 1 or tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"paged attention takes q, k, v as [1, heads, tokens, dim], got {q}, {k}, {v}")
    h, hkv = q.shape[1], k.shape[1]
    if not (isinstance(h, int) and isinstance(hkv, int) and h % hkv == 0) or q.shape[2] != k.shape[2]:
        raise ValueError(f"paged attention: {h} query heads over {hkv} KV heads, tokens {q.shape[2]} vs {k.shape[2]}")
    row, dtype = (k.shape[3], k.dtype) if attrs.kv_store is None else (k.shape[3] + KV_SCALE_BYTES, DType.U8)
    if cache.rank != 5 or cache.shape[1] != 2 or tuple(cache.shape[3:]) != (hkv, row) or cache.dtype != dtype:
        raise ValueError(f"paged attention: KV cache {cache} is not [pages, 2, page, {hkv}, {row}] of {dtype}")
    if attrs.kv_store not in (None, DType.I8, DType.F8E4M3):
        raise ValueError(f"paged attention: a KV cache stores float, int8 or float8_e4m3fn codes, not {attrs.kv_store}")
    if any(t.dtype is not DType.I32 for t in (table, lens, starts)) or (table.rank, lens.rank, starts.rank) != (2, 1, 1):
        raise ValueError(f"paged attention metadata must be int32 page_table [S, C], kv_lens [S], q_starts [S+1], "
                         f"got {table}, {lens}, {starts}")
    return q


def _source(attrs, *ts: TensorType) -> TensorType:
    raise AssertionError("source nodes carry their type explicitly")


def _const(attrs, *ts):
    return TensorType((), attrs.dtype)


def _full(attrs, *ts):
    return TensorType(tuple(attrs.shape), attrs.dtype)


def _arange(attrs, *ts):
    n = attrs.end - attrs.start
    if attrs.step != 1:
        if not isinstance(n, int):
            raise ValueError("arange with step != 1 needs static bounds")
        n = max(0, -(-n // attrs.step))
    return TensorType((n,), attrs.dtype)


def _all_gather(attrs, t: TensorType) -> TensorType:
    return TensorType((attrs.world, *t.shape), t.dtype)


def _recv(attrs, *ts) -> TensorType:
    return TensorType(tuple(attrs.shape), attrs.dtype)


INFER: dict[Op, Callable[..., TensorType]] = {
    Op.INPUT: _source, Op.WEIGHT: _source, Op.CONST: _const, Op.FULL: _full, Op.ARANGE: _arange,
    **{op: _unary for op in UNARY if op is not Op.CAST}, Op.CAST: _cast,
    **{op: _binary(op) for op in BINARY}, Op.WHERE: _where,
    **{op: _reduce for op in REDUCE}, Op.CUMSUM: _cumsum, Op.SOFTMAX: _axis_same,
    Op.MATMUL: _matmul, Op.RESHAPE: _reshape, Op.PERMUTE: _permute, Op.EXPAND: _expand,
    Op.SLICE: _slice, Op.CONCAT: _concat, Op.TAKE: _take, Op.INDEX: _index, Op.GATHER: _gather,
    Op.LAYER_NORM: _layer_norm, Op.RMS_NORM: _rms_norm, Op.ATTENTION: _attention,
    Op.PAGED_ATTENTION: _paged_attention,
    # mixture of experts
    Op.TOPK: _topk, Op.ROUTED_MATMUL: _routed_matmul,
    Op.QMATMUL: _qmatmul, Op.QTAKE: _qtake,  # weight-only quantization (passes/quantize.py)
    Op.ALL_REDUCE: _unary, Op.ALL_GATHER: _all_gather, Op.SEND: _unary, Op.RECV: _recv,
}


def infer_type(op: Op, attrs, inputs: Sequence[TensorType]) -> TensorType:
    return INFER[op](attrs, *inputs)
