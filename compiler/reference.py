"""numpy reference semantics of every op: the ground truth kernels are tested against.

Each rule takes the node's attrs, the input arrays, and the symbol environment (for
sources whose shape is symbolic). Floats are computed in the input precision except
where numpy lacks it (bf16 goes through float32).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from .ops import Op
from .symbolic import evaluate

Env = Mapping[str, int]


def _np(dt):
    return dt.numpy


def _erf(x: np.ndarray) -> np.ndarray:
    # math.erf vectorised; accurate to float64 rounding, which the tolerances assume.
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype)


def _gelu(attrs, x):
    xf = x.astype(np.float64)
    if attrs.approximate:
        y = 0.5 * xf * (1 + np.tanh(math.sqrt(2 / math.pi) * (xf + 0.044715 * xf ** 3)))
    else:
        y = 0.5 * xf * (1 + _erf(xf / math.sqrt(2)))
    return y.astype(x.dtype)


def _sigmoid(x):
    return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(x.dtype)


def _softmax(attrs, x, env=None):
    xf = x.astype(np.float64)
    e = np.exp(xf - xf.max(axis=attrs.axis, keepdims=True))
    return (e / e.sum(axis=attrs.axis, keepdims=True)).astype(x.dtype)


def _layer_norm(attrs, x, w, b, env=None):
    xf = x.astype(np.float64)
    mu = xf.mean(-1, keepdims=True)
    var = ((xf - mu) ** 2).mean(-1, keepdims=True)
    return ((xf - mu) / np.sqrt(var + attrs.eps) * w + b).astype(x.dtype)


def _rms_norm(attrs, x, w, env=None):
    xf = x.astype(np.float64)
    return (xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + attrs.eps) * w).astype(x.dtype)


def attention_reference(q, k, v, mask, scale: float, causal: bool) -> np.ndarray:
    """softmax(q k^T * scale + mask) v, with k/v heads shared across query-head groups."""
    group = q.shape[1] // k.shape[1]
    kf = np.repeat(k.astype(np.float64), group, axis=1)
    vf = np.repeat(v.astype(np.float64), group, axis=1)
    s = np.einsum("bhsd,bhtd->bhst", q.astype(np.float64), kf) * scale
    S, T = s.shape[-2], s.shape[-1]
    if causal:  # query i sees keys j <= i + (T - S): bottom-right aligned, as in a KV cache
        keep = np.arange(T)[None, :] <= np.arange(S)[:, None] + (T - S)
        s = np.where(keep, s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + mask.astype(np.float64)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    denom = e.sum(-1, keepdims=True)
    p = e / np.where(denom == 0, 1.0, denom)  # fully masked rows give zeros, not NaN
    return np.einsum("bhst,bhtd->bhsd", p, vf).astype(q.dtype)


def _attention(attrs, q, k, v, mask=None, env=None):
    return attention_reference(q, k, v, mask, attrs.scale, attrs.causal)


def _paged_attention(attrs, q, k, v, cache, table, lens, starts, env=None):
    from ..runtime.engine.paged_attention import paged_attention  # the runtime's kernel writes the cache

    codec = "" if attrs.kv_store is None else attrs.kv_store.value
    return paged_attention(q, k, v, cache, table, lens, starts, attrs.scale, attrs.window, codec=codec)


def _index(attrs, x, *idx, env=None):
    return x[tuple(i.astype(np.int64) for i in idx)]


def _take(attrs, x, idx, env=None):
    return np.take(x, idx.astype(np.int64), axis=attrs.axis)


def _slice(attrs, x, env):
    sl = [slice(None)] * x.ndim
    sl[attrs.axis] = slice(evaluate(attrs.start, env), evaluate(attrs.end, env), attrs.step)
    return x[tuple(sl)]


def _gather(attrs, x, idx, env=None):
    """torch.gather: the index may be smaller than x off the gather axis (no broadcasting)."""
    crop = tuple(slice(None) if d == attrs.axis else slice(0, n) for d, n in enumerate(idx.shape))
    return np.take_along_axis(x[crop], idx.astype(np.int64), axis=attrs.axis)


def topk_reference(x: np.ndarray, k: int, axis: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (smallest) along axis, best first; ties to the lower index,
    NaN above every number (torch's order)."""
    xf = np.moveaxis(x.astype(np.float64), axis, -1)
    key = np.where(np.isnan(xf), np.inf, -xf if largest else xf)
    nan_rank = np.isnan(xf) if largest else ~np.isnan(xf)  # NaN first when largest
    order = np.lexsort((key, ~nan_rank), axis=-1)[..., :k]  # stable: equal keys keep index order
    return np.moveaxis(order, -1, axis).astype(np.int64)


def _topk(attrs, x, env=None):
    return topk_reference(x, attrs.k, attrs.axis, attrs.largest)


def _routed_matmul(attrs, x, w, ids, env=None):
    wsel = w[ids.astype(np.int64)].astype(np.float64)  # [*, N, K] or [*, K, N]
    xf = x.astype(np.float64)
    eq = "...k,...nk->...n" if attrs.weight_nk else "...k,...kn->...n"
    return np.einsum(eq, xf, wsel)


def _qtake(attrs, qw, ids, scales, zeros=None, env=None):
    from .quant_layout import dequantize

    idx = np.asarray(ids, np.int64)
    rows = dequantize(qw[idx.reshape(-1)], scales[idx.reshape(-1)], None if zeros is None else zeros[idx.reshape(-1)],
                      attrs.bits, attrs.group)
    return rows.reshape(*idx.shape, rows.shape[-1])


def _qmatmul(attrs, x, qw, scales, zeros=None, env=None):
    from .quant_layout import dequantize

    if attrs.float8:  # FP8 (zeros is the rows' scales): both sides rounded to e4m3, then both scales
        from .quant_layout import float8_codes, float8_values

        x8 = float8_values(float8_codes(np.asarray(x, np.float32) / np.asarray(zeros, np.float32)))
        acc = np.matmul(x8, float8_values(qw).T)
        return acc * zeros.astype(np.float64) * scales[:, 0].astype(np.float64)
    if attrs.act_bits:  # W8A8 (zeros is the rows' scales): both sides' integer codes, exact products, both scales
        from .quant_layout import quantize_codes_rows

        xq = quantize_codes_rows(x, zeros)
        acc = np.matmul(xq.astype(np.int64), qw.astype(np.int64).T)
        return acc.astype(np.float64) * zeros.astype(np.float64) * scales[:, 0].astype(np.float64)
    w = dequantize(qw, scales, zeros, attrs.bits, attrs.group)  # [N, K] float64
    return np.matmul(x.astype(np.float64), w.T)


def _binop(fn):
    return lambda attrs, a, b, env=None: fn(a, b)


def _unop(fn):
    return lambda attrs, x, env=None: fn(x)


def _float_unop(fn):
    return lambda attrs, x, env=None: fn(x.astype(np.float64)).astype(x.dtype)


def _cumsum(attrs, x, env=None):
    return np.cumsum(x, axis=attrs.axis, dtype=np.int64 if x.dtype.kind in "biu" else x.dtype)


def _alone(what: str):
    """A collective or point-to-point op seen by a one-rank interpreter: exact for a group of one,
    otherwise it needs every rank's values (compiler/interpret_ranks.py runs the ranks in lockstep)."""
    def run(attrs, *xs, env=None):
        if what == "all_reduce" and attrs.world == 1:
            return xs[0]
        if what == "all_gather" and attrs.world == 1:
            return xs[0][None]
        from ..errors import LLMCError

        raise LLMCError(f"{what} needs the other ranks' values: run the rank graphs with interpret_ranks")
    return run


REFERENCE: dict[Op, Callable[..., np.ndarray]] = {
    Op.CONST: lambda a, env=None: np.array(a.value, dtype=_np(a.dtype)),
    Op.FULL: lambda a, env: np.full([evaluate(d, env) for d in a.shape], a.value, dtype=_np(a.dtype)),
    Op.ARANGE: lambda a, env: np.arange(evaluate(a.start, env), evaluate(a.end, env), a.step).astype(_np(a.dtype)),
    Op.NEG: _unop(np.negative), Op.EXP: _float_unop(np.exp), Op.LOG: _float_unop(np.log),
    Op.SQRT: _float_unop(np.sqrt), Op.RSQRT: _float_unop(lambda x: 1 / np.sqrt(x)),
    Op.TANH: _float_unop(np.tanh), Op.ERF: lambda a, x, env=None: _erf(x.astype(np.float64)).astype(x.dtype),
    Op.SIGMOID: _unop(_sigmoid), Op.RELU: _unop(lambda x: np.maximum(x, 0).astype(x.dtype)),
    Op.GELU: lambda a, x, env=None: _gelu(a, x), Op.SILU: _unop(lambda x: (x * _sigmoid(x)).astype(x.dtype)),
    Op.ABS: _unop(np.abs), Op.SIN: _float_unop(np.sin), Op.COS: _float_unop(np.cos),
    Op.RECIPROCAL: _float_unop(lambda x: 1 / x), Op.NOT: _unop(np.logical_not),
    Op.CAST: lambda a, x, env=None: x.astype(_np(a.dtype)),
    Op.ADD: _binop(np.add), Op.SUB: _binop(np.subtract), Op.MUL: _binop(np.multiply),
    Op.DIV: _binop(np.true_divide), Op.POW: _binop(np.power), Op.MAXIMUM: _binop(np.maximum),
    Op.MINIMUM: _binop(np.minimum), Op.EQ: _binop(np.equal), Op.NE: _binop(np.not_equal),
    Op.LT: _binop(np.less), Op.LE: _binop(np.less_equal), Op.GT: _binop(np.greater),
    Op.GE: _binop(np.greater_equal), Op.AND: _binop(np.logical_and), Op.OR: _binop(np.logical_or),
    Op.WHERE: lambda a, c, x, y, env=None: np.where(c, x, y),
    Op.SUM: lambda a, x, env=None: x.sum(axis=a.axes, keepdims=a.keepdims, dtype=x.dtype),
    Op.MEAN: lambda a, x, env=None: x.astype(np.float64).mean(axis=a.axes, keepdims=a.keepdims).astype(x.dtype),
    Op.MAX: lambda a, x, env=None: x.max(axis=a.axes, keepdims=a.keepdims),
    Op.MIN: lambda a, x, env=None: x.min(axis=a.axes, keepdims=a.keepdims),
    Op.CUMSUM: _cumsum, Op.SOFTMAX: _softmax,
    Op.MATMUL: lambda a, x, y, env=None: np.matmul(x.astype(np.float64), y.astype(np.float64)).astype(x.dtype),
    Op.RESHAPE: lambda a, x, env: x.reshape([evaluate(d, env) for d in a.shape]),
    Op.PERMUTE: lambda a, x, env=None: np.transpose(x, a.perm),
    Op.EXPAND: lambda a, x, env: np.broadcast_to(x, [evaluate(d, env) for d in a.shape]),
    Op.SLICE: _slice, Op.CONCAT: lambda a, *xs, env=None: np.concatenate(xs, axis=a.axis),
    Op.TAKE: _take, Op.INDEX: _index,
    Op.GATHER: _gather,
    Op.LAYER_NORM: _layer_norm, Op.RMS_NORM: _rms_norm, Op.ATTENTION: _attention,
    Op.PAGED_ATTENTION: _paged_attention,
    # mixture of experts
    Op.TOPK: _topk, Op.ROUTED_MATMUL: _routed_matmul,
    Op.QMATMUL: _qmatmul, Op.QTAKE: _qtake,
    Op.ALL_REDUCE: _alone("all_reduce"), Op.ALL_GATHER: _alone("all_gather"),
    Op.SEND: _alone("send"), Op.RECV: _alone("recv"),
}

def run_op(op: Op, attrs, inputs: list[np.ndarray], env: Env, out_dtype) -> np.ndarray:
    """Apply one op; the result is cast to the inferred dtype (numpy promotes unlike torch)."""
    out = REFERENCE[op](attrs, *inputs, env=env)
    return np.asarray(out).astype(out_dtype.numpy, copy=False)
