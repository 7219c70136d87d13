"""TE lowering of Op.QMATMUL: the weight-only quantized matmul, dequantizing in its B loads
(and of Op.QTAKE, the rows of a quantized table, dequantized the same way).

The kernel is the GEMM of te_rules._matmul (leading dims of x folded into M, M and N
padded to the register tile) whose right operand is a `qmm_deq` stage: the [K, N] float
panel computed from the packed integers (layout: compiler/quant_layout.py). The stage is
kept materialised (KEEP_PREFIXES), and the CPU matmul schedule computes it per output
tile, where it would otherwise copy the B panel (schedule.py): each packed byte is read
and dequantized once per row block into a [K, nt] panel that stays in cache while the
register tile runs over it. A decode step (M = 1) therefore reads 1 (int8) or 1/2 (int4)
bytes per weight instead of 4, with no full-size dequantized copy anywhere.
"""
from __future__ import annotations

from typing import Sequence

from tvm import te, tirx

from llmc.compiler.ir import Node
from llmc.compiler.ops import Op
from llmc.compiler.quant_layout import INT4_SYMMETRIC_ZERO

from .te_rules import (F32, MATMUL_COL_TILE, MATMUL_ROW_TILE, TE_RULES, LowerCtx, _clamp, _compute, _flat_index,
                       _pad, _raxis, _unflat_index, c64, cast, wrap_index)

I32 = "int32"


def _pow2(e) -> tirx.PrimExpr:
    """2^e as float32 for an int32 e in the normal range, built from its bits."""
    return tirx.reinterpret(F32, tirx.shift_left(e + tirx.const(127, I32), tirx.const(23, I32)))


def float8_decode(byte) -> tirx.PrimExpr:
    """The float32 value of a float8 e4m3fn bit pattern (an int32 0..255): sign, 4 exponent bits
    (bias 7), 3 mantissa bits; exponent 0 is subnormal (m * 2^-9)."""
    sign = tirx.shift_right(byte, tirx.const(7, I32))
    e = tirx.bitwise_and(tirx.shift_right(byte, tirx.const(3, I32)), tirx.const(15, I32))
    m = cast(tirx.bitwise_and(byte, tirx.const(7, I32)), F32)
    normal = (m + tirx.const(8.0, F32)) * _pow2(e - tirx.const(10, I32))
    mag = tirx.Select(e == tirx.const(0, I32), m * tirx.const(2.0 ** -9, F32), normal)
    return tirx.Select(sign == tirx.const(1, I32), -mag, mag)


def float8_round(v) -> tirx.PrimExpr:
    """v (float32, |v| <= 448) rounded to the nearest float8 e4m3fn value, ties to even: below 2^-6
    on the subnormal grid of 2^-9, above by dropping all but 3 mantissa bits of its float32 bits."""
    a = tirx.abs(v)
    bits = tirx.reinterpret(I32, a)
    lsb = tirx.bitwise_and(tirx.shift_right(bits, tirx.const(20, I32)), tirx.const(1, I32))
    kept = tirx.bitwise_and(bits + tirx.const(0x7FFFF, I32) + lsb, tirx.const(-(1 << 20), I32))
    sub = tirx.nearbyint(a * tirx.const(512.0, F32)) * tirx.const(2.0 ** -9, F32)
    mag = tirx.Select(a < tirx.const(2.0 ** -6, F32), sub, tirx.reinterpret(F32, kept))
    return tirx.Select(v < tirx.const(0.0, F32), -mag, mag)


def _weight_value(a, qw, scales, zeros, n, k, acc: str) -> tirx.PrimExpr:
    """W[n, k] of a packed weight (QMatmulAttrs a): the float weight, or for W8A8 / FP8 the code's
    value (their scales come in the GEMM's epilogue)."""
    g = tirx.floordiv(k, c64(a.group))
    if a.float8:
        return cast(float8_decode(cast(qw(n, k), I32)), acc)
    if a.bits == 8:
        q = cast(qw(n, k), acc)
    else:  # two elements per byte: even k in the low nibble, odd k in the high one
        byte = cast(qw(n, tirx.floordiv(k, c64(2))), I32)
        shift = cast(tirx.floormod(k, c64(2)), I32) * tirx.const(4, I32)
        q = cast(tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, I32)), acc)
    if a.act_bits:
        return q
    if zeros is not None:
        q = q - cast(zeros(n, g), acc)
    elif a.bits == 4:
        q = q - tirx.const(float(INT4_SYMMETRIC_ZERO), acc)
    return q * cast(scales(n, g), acc)


def _dequant_panel(ctx: LowerCtx, node: Node, qw, scales, zeros, acc: str, n_dim, n_pad) -> te.Tensor:
    """qmm_deq[k, n] = the float weight W[n, k] (n clamped into range on the padded columns)."""
    k_dim = ctx.dim(node.inputs[0].shape[-1])
    return te.compute((k_dim, n_pad), lambda k, n: _weight_value(node.attrs, qw, scales, zeros, _clamp(n, n_dim, n_pad),
                                                                  k, acc), name=ctx.name("qmm_deq"))


def _qtake(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
    """out[*i, k] = W[ids[*i], k]: the picked rows dequantized as they are read (an id out of range
    wraps like TAKE's; the runtime's input checks refuse those first)."""
    qw, ids, scales, *rest = ins
    zeros = rest[0] if rest else None
    r = len(node.inputs[1].shape)
    rows = ctx.dim(node.inputs[0].shape[0])
    odt = node.dtype.value
    acc = "float64" if odt == "float64" else F32

    def f(*i):
        n = wrap_index(ids(*i[:r]), rows)
        return cast(_weight_value(node.attrs, qw, scales, zeros, n, i[r], acc), odt)

    return _compute(ctx, node, f)


def _qmatmul(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
    """Weight-only: x @ dequantized W. W8A8 (act_bits 8; the 4th input is the rows' scales sx):
    the A operand is x's int8 codes round(x / sx) clipped to +-127 and B the weight's codes, both
    as float32 (their products and sums are integers, exact while K * 127^2 < 2^24, within float32
    rounding beyond), then acc * sx * scale; the same GEMM schedule as the weight-only kernel."""
    x, qw, scales, *rest = ins
    w8a8 = bool(node.attrs.act_bits)
    zeros = rest[0] if rest and not w8a8 else None
    xs = rest[0] if w8a8 else None
    sx = node.inputs[0].shape
    odt = node.dtype.value
    acc = "float64" if odt == "float64" else F32
    n_static = node.shape[-1]
    n_dim = c64(n_static)
    n_pad = _pad(n_dim, n_static, MATMUL_COL_TILE)
    deq = _dequant_panel(ctx, node, qw, scales, zeros, acc, n_dim, n_pad)
    k = _raxis(ctx, ctx.dim(sx[-1]), "k")
    lead = ctx.shape(sx[:-1])
    m_flat, static = lead[0], sx[0]
    for d, s in zip(lead[1:], sx[1:-1]):
        m_flat, static = m_flat * d, s * static
    m_pad = _pad(m_flat, static, MATMUL_ROW_TILE)
    def a_load(m, kv):
        row = _unflat_index(_clamp(m, m_flat, m_pad), lead)
        v = cast(x(*(row + [kv])), acc)
        if not w8a8:
            return v
        v = v / cast(xs(*(row + [c64(0)])), acc)
        if node.attrs.float8:
            return float8_round(v)
        lim = tirx.const(127.0, acc)
        return tirx.max(tirx.min(tirx.nearbyint(v), lim), -lim)

    acc2 = te.compute((m_pad, n_pad), lambda m, n: te.sum(a_load(m, k.var) * deq(k.var, n), axis=k),
                      name=ctx.name("matmul_acc"))
    if not w8a8:
        return _compute(ctx, node, lambda *i: cast(acc2(_flat_index(i[:-1], lead), i[-1]), odt), "matmul_out")
    return _compute(ctx, node, lambda *i: cast(acc2(_flat_index(i[:-1], lead), i[-1]) *
                                               cast(xs(*(list(i[:-1]) + [c64(0)])), acc) *
                                               cast(scales(i[-1], c64(0)), acc), odt), "matmul_out")


# te_rules imports this module on its last line; either import order registers the rule
TE_RULES.update({Op.QMATMUL: _qmatmul, Op.QTAKE: _qtake})
