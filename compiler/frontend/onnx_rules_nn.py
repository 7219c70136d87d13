"""ONNX rules for CNN-style operators, decomposed into existing IR ops.

The IR has no convolution or pooling op; these models (ONNX's backend test models, older
vision exports) are rare next to transformers, so the importer lowers them without new ops:
a window op pads its input, flattens the spatial dims and takes every window's elements
with one `TAKE` of a constant index table ("im2col"), then a Conv is a `MATMUL` with the
reshaped kernel and a pool a `MAX`/`MEAN`-style reduction. Spatial dims must be static
(the index table is built at import time); batch and channels may be symbolic.

Also here: BatchNormalization (inference), Pad, and small activations (LeakyRelu, Elu,
Selu, PRelu, HardSigmoid, HardSwish, Softplus, Softsign, Shrink, ThresholdedRelu, Mish, Celu).
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import LLMCError, UnsupportedOpError
from ..dtypes import DType
from ..ops import AxisAttrs, FullAttrs, Op, ReduceAttrs, SliceAttrs
from .onnx_context import NodeCtx, Val
from .onnx_rules import check_types, norm_axes, permute, reshape, rule, scalar

INDEX_LIMIT = 1 << 24  # largest im2col index table, in elements


# ---- padding ------------------------------------------------------------------------------
def pad_axis(x: NodeCtx, v: Val, axis: int, before: int, after: int, value) -> Val:
    """Constant padding of one axis (negative amounts crop)."""
    if before < 0 or after < 0:
        d = v.shape[axis]
        v = x.apply(Op.SLICE, [v], SliceAttrs(axis, max(-before, 0), d - max(-after, 0), 1))
        before, after = max(before, 0), max(after, 0)
    def full(n: int) -> Val:
        shape = tuple(n if i == axis else d for i, d in enumerate(v.shape))
        return x.source(Op.FULL, FullAttrs(shape, value, v.dtype))

    parts = ([full(before)] if before else []) + [v] + ([full(after)] if after else [])
    return v if len(parts) == 1 else x.apply(Op.CONCAT, parts, AxisAttrs(axis))


def _pad_value(v: Val, value: float):
    if v.dtype.is_float:
        return float(value)
    if v.dtype is DType.BOOL:
        return bool(value)
    return int(value)


def _edge_or_reflect(x: NodeCtx, v: Val, axis: int, before: int, after: int, mode: str) -> Val:
    d = v.shape[axis]
    if not isinstance(d, int):
        raise UnsupportedOpError(f"Pad mode {mode!r} needs a static dim, axis {axis} is {d}")
    i = np.arange(-before, d + after)
    if mode == "edge":
        idx = np.clip(i, 0, d - 1)
    elif mode == "reflect":
        if d == 1:
            idx = np.zeros_like(i)
        else:
            p = 2 * (d - 1)
            idx = np.abs(((i % p) + p) % p)
            idx = np.where(idx >= d, p - idx, idx)
    else:  # wrap
        idx = i % d
    return x.apply(Op.TAKE, [v, x.const(idx.astype(np.int64), DType.I64)], AxisAttrs(axis))


@rule("Pad")
def _pad(x: NodeCtx):
    v = x.val(0)
    pads = x.ints(1) if x.has(1) else x.attr_ints("pads", [])
    mode = x.attr_str("mode", "constant")
    value = 0.0
    if x.has(2):
        value = x.scalar(2)
    elif x.attr_float("value") is not None:
        value = x.attr_float("value")
    axes = norm_axes(x.ints(3), v.rank) if x.has(3) else tuple(range(v.rank))
    if len(pads) != 2 * len(axes):
        raise LLMCError(f"pads has {len(pads)} values for {len(axes)} axes")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise UnsupportedOpError(f"Pad mode {mode!r} is not supported")
    for k, ax in enumerate(axes):
        b, a = pads[k], pads[k + len(axes)]
        if b == 0 and a == 0:
            continue
        if mode == "constant" or (b <= 0 and a <= 0):
            v = pad_axis(x, v, ax, b, a, _pad_value(v, value))
        else:
            if b < 0 or a < 0:
                raise UnsupportedOpError(f"Pad mode {mode!r} with negative pads is not supported")
            v = _edge_or_reflect(x, v, ax, b, a, mode)
    return v


# ---- windows (im2col) ---------------------------------------------------------------------
class Window:
    """Geometry of a sliding-window op over the spatial dims (static)."""

    def __init__(self, x: NodeCtx, spatial: tuple[int, ...], kernel: tuple[int, ...], ceil_mode: bool = False,
                 explicit: dict | None = None):
        """Geometry from the node's strides/dilations/pads/auto_pad, or from `explicit` (same keys)."""
        r = len(spatial)
        get = (lambda k, d: explicit.get(k, d)) if explicit is not None else (
            lambda k, d: x.attr_str(k, d) if k == "auto_pad" else x.attr_ints(k, d))
        self.kernel = kernel
        self.strides = tuple(get("strides", [1] * r))
        self.dil = tuple(get("dilations", [1] * r))
        pads = list(get("pads", [0] * (2 * r)))
        auto = get("auto_pad", "NOTSET")
        if len(self.strides) != r or len(self.dil) != r or len(pads) != 2 * r or len(kernel) != r:
            raise LLMCError(f"strides/dilations/pads/kernel_shape do not match {r} spatial dims")
        if min(self.strides + self.dil + kernel, default=1) < 1 or min(pads, default=0) < 0:
            raise LLMCError("strides, dilations and kernel sizes must be positive, pads non-negative")
        eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, self.dil))
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = tuple(-(-s // st) for s, st in zip(spatial, self.strides))
            total = [max((o - 1) * st + e - s, 0) for o, st, e, s in zip(out, self.strides, eff, spatial)]
            lo = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
            pads = lo + [t - b for t, b in zip(total, lo)]
        elif auto == "VALID":
            pads = [0] * (2 * r)
        elif auto != "NOTSET":
            raise LLMCError(f"unknown auto_pad {auto!r}")
        self.begin, self.end = tuple(pads[:r]), tuple(pads[r:])
        rnd = math.ceil if ceil_mode else math.floor
        self.out = []
        for s, b, e, ef, st in zip(spatial, self.begin, self.end, eff, self.strides):
            n = int(rnd((s + b + e - ef) / st)) + 1
            if ceil_mode and (n - 1) * st >= s + b:  # the last window must start inside the input or left pad
                n -= 1
            if n < 1:
                raise LLMCError(f"the window ({ef}) is larger than the padded input ({s + b + e})")
            self.out.append(n)
        self.out = tuple(self.out)
        # extra right padding so ceil-mode windows stay in bounds
        self.extra = tuple(max((o - 1) * st + ef - (s + b + e), 0)
                           for o, st, ef, s, b, e in zip(self.out, self.strides, eff, spatial, self.begin, self.end))
        self.spatial = spatial

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(s + b + e + x for s, b, e, x in zip(self.spatial, self.begin, self.end, self.extra))

    def index_table(self) -> np.ndarray:
        """[prod(out), prod(kernel)] flat indices into the padded spatial block."""
        n = math.prod(self.out) * math.prod(self.kernel)
        if n > INDEX_LIMIT:
            raise UnsupportedOpError(f"window of {n} elements is too large to lower")
        grids = []
        for o, k, st, d in zip(self.out, self.kernel, self.strides, self.dil):
            grids.append((np.arange(o)[:, None] * st + np.arange(k)[None, :] * d))  # [o, k]
        strides = np.cumprod((self.padded[1:] + (1,))[::-1])[::-1]
        idx = np.zeros((1, 1), np.int64)
        for g, s in zip(grids, strides):  # build [prod(out so far), prod(kernel so far)] row-major
            idx = (idx[:, None, :, None] + g[None, :, None, :] * int(s)).reshape(idx.shape[0] * g.shape[0], -1)
        return idx.astype(np.int64)

    def patches(self, x: NodeCtx, v: Val, value) -> Val:
        """v [N, C, *spatial] -> [N, C, prod(out), prod(kernel)] (pads filled with `value`)."""
        for i in range(len(self.spatial)):
            b, e = self.begin[i], self.end[i] + self.extra[i]
            if b or e:
                v = pad_axis(x, v, 2 + i, b, e, value)
        v = reshape(x, v, tuple(v.shape[:2]) + (math.prod(self.padded),))
        return x.apply(Op.TAKE, [v, x.const(self.index_table(), DType.I64)], AxisAttrs(2))

    def counts(self, include_pad: bool) -> np.ndarray:
        """[prod(out), 1] elements each window covers (AveragePool divisors)."""
        mask = np.zeros(self.padded, np.float64)
        sl = tuple(slice(0 if include_pad else b, (b + s + e) if include_pad else b + s)
                   for s, b, e in zip(self.spatial, self.begin, self.end))
        mask[sl] = 1
        return mask.reshape(-1)[self.index_table()].sum(-1, keepdims=True)


def _spatial(v: Val, what: str) -> tuple[int, ...]:
    if v.rank < 3:
        raise LLMCError(f"{what} input must be [N, C, *spatial], got rank {v.rank}")
    sp = v.shape[2:]
    if not all(isinstance(d, int) for d in sp):
        raise UnsupportedOpError(f"{what} needs static spatial dims, got {list(sp)}")
    return tuple(sp)


def _static_weight(v: Val, w: Val, what: str) -> None:
    if w.rank != v.rank or not all(isinstance(d, int) for d in w.shape):
        raise LLMCError(f"{what} weight must be a static tensor of rank {v.rank}, got {list(w.shape)}")


@rule("Conv")
def _conv(x: NodeCtx):
    v, w = x.val(0), x.val(1)
    check_types(x, [v, w], logical=False)
    sp = _spatial(v, "Conv")
    _static_weight(v, w, "Conv")
    kernel = tuple(x.attr_ints("kernel_shape", w.shape[2:]))
    if kernel != tuple(w.shape[2:]):
        raise LLMCError(f"kernel_shape {list(kernel)} does not match the weight {list(w.shape)}")
    return conv(x, v, w, x.val(2) if x.has(2) else None, x.attr_int("group", 1), Window(x, sp, kernel))


def conv(x: NodeCtx, v: Val, w: Val, bias: Val | None, g: int, win: Window) -> Val:
    """v [N, C, *S] conv w [M, C/g, *K] (+ bias [M]) over the window geometry `win`."""
    m, cg = w.shape[0], w.shape[1]
    c, sp = v.shape[1], win.spatial
    if g < 1 or m % g or (isinstance(c, int) and c != cg * g):
        raise LLMCError(f"group={g} does not fit {c} input channels and weight {list(w.shape)}")
    kernel = win.kernel
    n, k, o = v.shape[0], math.prod(kernel), math.prod(win.out)
    p = win.patches(x, v, _pad_value(v, 0))  # [N, C, O, K]
    p = reshape(x, p, (n, g, cg, o, k))
    p = reshape(x, permute(x, p, (0, 1, 3, 2, 4)), (n, g, o, cg * k))  # [N, g, O, C/g*K]
    wk = permute(x, reshape(x, w, (g, m // g, cg * k)), (0, 2, 1))  # [g, C/g*K, M/g]
    y = x.apply(Op.MATMUL, [p, wk])  # [N, g, O, M/g]
    y = reshape(x, permute(x, y, (0, 1, 3, 2)), (n, m) + win.out)
    if bias is not None:
        y = x.apply(Op.ADD, [y, reshape(x, bias, (m,) + (1,) * len(sp))])
    return y


@rule("ConvTranspose")
def _conv_transpose(x: NodeCtx):
    """A stride-1 Conv over the input with (stride - 1) zeros between elements, padded by
    dilation * (kernel - 1) - pads, with the kernel flipped and its channel axes swapped."""
    v, w = x.val(0), x.val(1)
    check_types(x, [v, w], logical=False)
    sp = _spatial(v, "ConvTranspose")
    _static_weight(v, w, "ConvTranspose")
    r, g = len(sp), x.attr_int("group", 1)
    kernel = tuple(w.shape[2:])
    if tuple(x.attr_ints("kernel_shape", kernel)) != kernel:
        raise LLMCError(f"kernel_shape does not match the weight {list(w.shape)}")
    strides = x.attr_ints("strides", [1] * r)
    dil = x.attr_ints("dilations", [1] * r)
    out_pad = x.attr_ints("output_padding", [0] * r)
    pads = x.attr_ints("pads", [0] * (2 * r))
    auto = x.attr_str("auto_pad", "NOTSET")
    if not (len(strides) == len(dil) == len(out_pad) == r and len(pads) == 2 * r):
        raise LLMCError(f"strides/dilations/output_padding/pads do not match {r} spatial dims")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    out_shape = x.attr_ints("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(out_shape[-r:]) if out_shape is not None else [s * st for s, st in zip(sp, strides)]
        total = [st * (s - 1) + op + e - o for st, s, op, e, o in zip(strides, sp, out_pad, eff, want)]
        first = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        pads = first + [t - f for t, f in zip(total, first)]
    elif auto not in ("NOTSET", "VALID"):
        raise LLMCError(f"unknown auto_pad {auto!r}")
    elif auto == "VALID":
        pads = [0] * (2 * r)
    c, mg = w.shape[0], w.shape[1]
    if g < 1 or c % g:
        raise LLMCError(f"group={g} does not fit weight {list(w.shape)}")
    for i, (s, st) in enumerate(zip(sp, strides)):  # zeros between elements: take from [x, 0]
        if st > 1:
            idx = np.where(np.arange((s - 1) * st + 1) % st == 0, np.arange((s - 1) * st + 1) // st, s)
            v = x.apply(Op.TAKE, [pad_axis(x, v, 2 + i, 0, 1, _pad_value(v, 0)),
                                  x.const(idx.astype(np.int64), DType.I64)], AxisAttrs(2 + i))
    for i in range(r):  # the transposed kernel: flip every spatial axis
        w = x.apply(Op.TAKE, [w, x.const(np.arange(kernel[i] - 1, -1, -1, dtype=np.int64), DType.I64)],
                    AxisAttrs(2 + i))
    wt = reshape(x, permute(x, reshape(x, w, (g, c // g, mg) + kernel), (0, 2, 1) + tuple(range(3, 3 + r))),
                 (g * mg, c // g) + kernel)
    conv_pads = [e - 1 - p for e, p in zip(eff, pads[:r])] + [e - 1 - p + op for e, p, op in zip(eff, pads[r:], out_pad)]
    for i in range(r):  # negative amounts crop; the window then sees no padding
        b, a = conv_pads[i], conv_pads[r + i]
        if b < 0 or a < 0:
            v = pad_axis(x, v, 2 + i, min(b, 0), min(a, 0), 0)
            conv_pads[i], conv_pads[r + i] = max(b, 0), max(a, 0)
    win = Window(x, tuple(v.shape[2:]), kernel, explicit={"dilations": dil, "pads": conv_pads})
    return conv(x, v, wt, x.val(2) if x.has(2) else None, g, win)


@rule("MaxPool", "AveragePool", "LpPool")
def _pool(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    sp = _spatial(v, x.op_type)
    if len(x.proto.output) > 1 and x.proto.output[1]:
        raise UnsupportedOpError("MaxPool's Indices output is not supported")
    kernel = x.attr_ints("kernel_shape")
    if kernel is None:
        raise LLMCError("missing attribute 'kernel_shape'")
    if x.op_type != "MaxPool" and x.attr_ints("dilations") and set(x.attr_ints("dilations")) != {1}:
        raise UnsupportedOpError(f"{x.op_type} with dilations is not supported")
    win = Window(x, sp, tuple(kernel), ceil_mode=bool(x.attr_int("ceil_mode", 0)))
    shape = tuple(v.shape[:2]) + win.out
    last = ReduceAttrs((3,), False)
    if x.op_type == "MaxPool":
        low = -math.inf if v.dtype.is_float else int(np.iinfo(v.dtype.numpy).min)
        return reshape(x, x.apply(Op.MAX, [win.patches(x, v, low)], last), shape)
    if x.op_type == "LpPool":
        pw = x.attr_int("p", 2)
        a = x.apply(Op.ABS, [win.patches(x, v, _pad_value(v, 0))])
        s = x.apply(Op.SUM, [x.apply(Op.POW, [a, scalar(x, pw, v.dtype)])], last)
        return reshape(x, x.apply(Op.POW, [s, scalar(x, 1.0 / pw, v.dtype)]), shape)
    total = x.apply(Op.SUM, [win.patches(x, v, _pad_value(v, 0))], last)  # [N, C, O]
    counts = win.counts(bool(x.attr_int("count_include_pad", 0))).reshape(-1)
    div = x.const(counts.astype(v.dtype.numpy), v.dtype) if len(set(counts)) > 1 else scalar(x, counts[0], v.dtype)
    return reshape(x, x.apply(Op.DIV, [total, div]), shape)


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(x: NodeCtx):
    v = x.val(0)
    if v.rank < 3:
        raise LLMCError(f"input must be [N, C, *spatial], got rank {v.rank}")
    axes = ReduceAttrs(tuple(range(2, v.rank)), True)
    if x.op_type == "GlobalLpPool":
        pw = x.attr_int("p", 2)
        s = x.apply(Op.SUM, [x.apply(Op.POW, [x.apply(Op.ABS, [v]), scalar(x, pw, v.dtype)])], axes)
        return x.apply(Op.POW, [s, scalar(x, 1.0 / pw, v.dtype)])
    return x.apply(Op.MEAN if x.op_type == "GlobalAveragePool" else Op.MAX, [v], axes)


# ---- normalization ------------------------------------------------------------------------
def _per_channel(x: NodeCtx, t: Val, rank: int) -> Val:
    return reshape(x, t, (t.shape[0],) + (1,) * (rank - 2)) if rank > 2 else t


@rule("BatchNormalization")
def _batch_norm(x: NodeCtx):
    if x.attr_int("training_mode", 0) or (len(x.proto.output) > 1 and any(x.proto.output[1:])):
        raise UnsupportedOpError("BatchNormalization in training mode is not supported")
    v = x.val(0)
    if v.rank < 2:
        raise LLMCError(f"input must be [N, C, ...], got rank {v.rank}")
    scale, bias, mean, var = (_per_channel(x, x.val(i), v.rank) for i in (1, 2, 3, 4))
    eps = x.attr_float("epsilon", 1e-5)
    inv = x.apply(Op.RSQRT, [x.apply(Op.ADD, [var, scalar(x, eps, var.dtype)])])
    y = x.apply(Op.MUL, [x.apply(Op.SUB, [v, mean]), x.apply(Op.MUL, [inv, scale])])
    return x.apply(Op.ADD, [y, bias])


@rule("InstanceNormalization")
def _instance_norm(x: NodeCtx):
    v = x.val(0)
    if v.rank < 3:
        raise LLMCError(f"input must be [N, C, *spatial], got rank {v.rank}")
    axes = ReduceAttrs(tuple(range(2, v.rank)), True)
    mean = x.apply(Op.MEAN, [v], axes)
    d = x.apply(Op.SUB, [v, mean])
    var = x.apply(Op.MEAN, [x.apply(Op.MUL, [d, d])], axes)
    inv = x.apply(Op.RSQRT, [x.apply(Op.ADD, [var, scalar(x, x.attr_float("epsilon", 1e-5), v.dtype)])])
    y = x.apply(Op.MUL, [x.apply(Op.MUL, [d, inv]), _per_channel(x, x.val(1), v.rank)])
    return x.apply(Op.ADD, [y, _per_channel(x, x.val(2), v.rank)])


@rule("LRN")
def _lrn(x: NodeCtx):
    """x / (bias + alpha / size * sum of x^2 over `size` neighbouring channels) ^ beta."""
    v = x.val(0)
    check_types(x, [v], logical=False)
    size = x.attr_int("size")
    if size is None or size < 1 or v.rank < 3:
        raise LLMCError("LRN needs size >= 1 and an [N, C, ...] input")
    c = v.shape[1]
    if not isinstance(c, int):
        raise UnsupportedOpError(f"LRN needs a static channel dim, got {c}")
    alpha, beta, bias = x.attr_float("alpha", 1e-4), x.attr_float("beta", 0.75), x.attr_float("bias", 1.0)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = pad_axis(x, x.apply(Op.MUL, [v, v]), 1, lo, hi, _pad_value(v, 0))
    idx = np.arange(c)[:, None] + np.arange(size)[None, :]  # [C, size] into the padded channels
    win = x.apply(Op.TAKE, [sq, x.const(idx.astype(np.int64), DType.I64)], AxisAttrs(1))
    total = x.apply(Op.SUM, [win], ReduceAttrs((2,), False))
    base = x.apply(Op.ADD, [x.apply(Op.MUL, [total, scalar(x, alpha / size, v.dtype)]), scalar(x, bias, v.dtype)])
    return x.apply(Op.DIV, [v, x.apply(Op.POW, [base, scalar(x, beta, v.dtype)])])


# ---- activations --------------------------------------------------------------------------
def _lt0(x: NodeCtx, v: Val) -> Val:
    return x.apply(Op.LT, [v, scalar(x, 0, v.dtype)])


@rule("LeakyRelu", "PRelu")
def _leaky(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    slope = x.val(1) if x.op_type == "PRelu" else scalar(x, x.attr_float("alpha", 0.01), v.dtype)
    if x.op_type == "PRelu" and slope.rank == 1 and v.rank > 2 and v.shape[-1] not in (slope.shape[0], 1) \
            and slope.shape[0] == v.shape[1]:
        slope = reshape(x, slope, (slope.shape[0],) + (1,) * (v.rank - 2))  # opset < 7: one slope per channel
    return x.apply(Op.WHERE, [_lt0(x, v), x.apply(Op.MUL, [v, slope]), v])


@rule("Elu", "Celu", "Selu")
def _elu(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    t = x.op_type
    alpha = x.attr_float("alpha", {"Elu": 1.0, "Celu": 1.0, "Selu": 1.6732632423543772848170429916717}[t])
    xs = x.apply(Op.DIV, [v, scalar(x, alpha, v.dtype)]) if t == "Celu" else v
    neg = x.apply(Op.MUL, [x.apply(Op.SUB, [x.apply(Op.EXP, [xs]), scalar(x, 1, v.dtype)]),
                           scalar(x, alpha, v.dtype)])
    y = x.apply(Op.WHERE, [_lt0(x, v), neg, v])
    if t == "Selu":
        y = x.apply(Op.MUL, [y, scalar(x, x.attr_float("gamma", 1.0507009873554804934193349852946), v.dtype)])
    return y


@rule("HardSigmoid", "HardSwish")
def _hard_sigmoid(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    a, b = (1 / 6, 0.5) if x.op_type == "HardSwish" else (x.attr_float("alpha", 0.2), x.attr_float("beta", 0.5))
    h = x.apply(Op.ADD, [x.apply(Op.MUL, [v, scalar(x, a, v.dtype)]), scalar(x, b, v.dtype)])
    h = x.apply(Op.MINIMUM, [x.apply(Op.MAXIMUM, [h, scalar(x, 0, v.dtype)]), scalar(x, 1, v.dtype)])
    return x.apply(Op.MUL, [v, h]) if x.op_type == "HardSwish" else h


@rule("Softplus", "Softsign", "Mish")
def _soft(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    one = scalar(x, 1, v.dtype)
    if x.op_type == "Softsign":
        return x.apply(Op.DIV, [v, x.apply(Op.ADD, [x.apply(Op.ABS, [v]), one])])
    # softplus(v) = max(v, 0) + log(1 + exp(-|v|)): no overflow for large |v|
    sp = x.apply(Op.ADD, [x.apply(Op.RELU, [v]),
                          x.apply(Op.LOG, [x.apply(Op.ADD, [one, x.apply(Op.EXP, [x.apply(Op.NEG, [x.apply(Op.ABS, [v])])])])])])
    return x.apply(Op.MUL, [v, x.apply(Op.TANH, [sp])]) if x.op_type == "Mish" else sp


@rule("Shrink")
def _shrink(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    lambd, bias = x.attr_float("lambd", 0.5), x.attr_float("bias", 0.0)
    lo = x.apply(Op.LT, [v, scalar(x, -lambd, v.dtype)])
    hi = x.apply(Op.GT, [v, scalar(x, lambd, v.dtype)])
    zero = scalar(x, 0, v.dtype)
    y = x.apply(Op.WHERE, [hi, x.apply(Op.SUB, [v, scalar(x, bias, v.dtype)]), zero])
    return x.apply(Op.WHERE, [lo, x.apply(Op.ADD, [v, scalar(x, bias, v.dtype)]), y])


@rule("ThresholdedRelu")
def _thresholded_relu(x: NodeCtx):
    v = x.val(0)
    check_types(x, [v], logical=False)
    return x.apply(Op.WHERE, [x.apply(Op.GT, [v, scalar(x, x.attr_float("alpha", 1.0), v.dtype)]), v,
                              scalar(x, 0, v.dtype)])
