"""Every op's TE rule, built for llvm and checked against the numpy reference.

All kernels of this module are compiled by one tvm.compile (module fixture); each test
runs its kernel at two sizes of its symbolic dims.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import node, sym
from llmc.compiler.ops import (BINARY, COMPARE, UNARY, ArangeAttrs, AttentionAttrs, AxisAttrs, CastAttrs, ConstAttrs,
                               FullAttrs, GeluAttrs, NormAttrs, Op, PermuteAttrs, ReduceAttrs, ShapeAttrs, SliceAttrs)

from tvm_cases import Case, build_cases, indices, inp, positive, run_case

b, s, t = sym("b"), sym("s"), sym("t")
BS = ({"b": 2, "s": 5}, {"b": 3, "s": 17})
S_ONLY = ({"s": 3}, {"s": 33})
F32, F16, BF16, I64, I32, BOOL = DType.F32, DType.F16, DType.BF16, DType.I64, DType.I32, DType.BOOL

CASES: list[Case] = []


def case(name, inputs, outputs, sizes=BS, **kw) -> Case:
    c = Case(name, inputs, outputs if isinstance(outputs, (list, tuple)) else [outputs], sizes, **kw)
    CASES.append(c)
    return c


# (an input that only binds symbols for the reference interpreter, when no input has a bare
#  symbolic dim, is named "bind"; the kernel does not read it)

# ---- elementwise unary ------------------------------------------------------------------
_POSITIVE = {Op.LOG, Op.SQRT, Op.RSQRT}
for op in sorted(UNARY - {Op.CAST, Op.NOT}, key=lambda o: o.name):
    x = inp("x", (b, s, 7))
    attrs = GeluAttrs(False) if op is Op.GELU else None
    case(f"u_{op.name.lower()}", [x], node(op, [x], attrs), gens={"x": positive} if op in _POSITIVE else {},
         atol=1e-6 if op in _POSITIVE else 1e-5)
x = inp("x", (b, s, 7))
case("u_gelu_tanh", [x], node(Op.GELU, [x], GeluAttrs(True)))
x = inp("x", (s, 9), BOOL)
case("u_not", [x], node(Op.NOT, [x]), S_ONLY)
x = inp("x", (s, 40))
case("u_exp_wide", [x], node(Op.EXP, [x]), S_ONLY, gens={"x": lambda r, sh, d: (r.standard_normal(sh) * 30).astype(
    np.float32)}, rtol=3e-6, atol=1e-30)
x = inp("x", (s, 40))
case("u_erf_tanh_wide", [x], [node(Op.ERF, [x]), node(Op.TANH, [x]), node(Op.SIGMOID, [x])], S_ONLY,
     gens={"x": lambda r, sh, d: (r.standard_normal(sh) * 4).astype(np.float32)}, atol=2e-6, rtol=1e-5)
x = inp("x", (s, 8), F16)
case("u_silu_f16", [x], node(Op.SILU, [x]), S_ONLY, rtol=1e-3, atol=1e-3)
for src, dst in [(F32, F16), (F32, I32), (F32, BOOL), (BOOL, F32), (I64, F32), (F16, F32), (F32, BF16), (BF16, F32),
                 (I32, I64)]:
    x = inp("x", (s, 6), src)
    gens = {"x": lambda r, sh, d: (r.standard_normal(sh) * 3).astype(d.numpy)} if src.is_float else {}
    if src is F32 and dst is BOOL:
        gens = {"x": lambda r, sh, d: np.where(r.random(sh) < 0.3, 0, r.standard_normal(sh)).astype(np.float32)}
    case(f"cast_{src.value}_{dst.value}", [x], node(Op.CAST, [x], CastAttrs(dst)), S_ONLY, gens=gens,
         rtol=1e-2 if BF16 in (src, dst) else 1e-5)

# ---- elementwise binary (broadcasting over a symbolic dim) -------------------------------
for op in sorted(BINARY, key=lambda o: o.name):
    dt = BOOL if op in (Op.AND, Op.OR) else F32
    x, y = inp("x", (b, 1, 5), dt), inp("y", (s, 5), dt)
    gens = {"x": positive} if op is Op.POW else {}
    if op in COMPARE and dt is F32:  # integer-valued floats so equality happens
        gens = {n: (lambda r, sh, d: r.integers(-2, 3, size=sh).astype(np.float32)) for n in ("x", "y")}
    case(f"bin_{op.name.lower()}", [x, y], node(op, [x, y]), gens=gens)
x, y = inp("x", (s, 4), F16), inp("y", (4,), F32)
case("bin_add_f16_f32", [x, y], node(Op.ADD, [x, y]), S_ONLY)
x, y = inp("x", (s, 4), I64), inp("y", (1, 4), F32)
case("bin_mul_i64_f32", [x, y], node(Op.MUL, [x, y]), S_ONLY)
x, y = inp("x", (s, 4), I64), inp("y", (4,), I64)
case("bin_div_i64", [x, y], [node(Op.DIV, [x, y]), node(Op.SUB, [x, y]), node(Op.MAXIMUM, [x, y])], S_ONLY,
     gens={"y": lambda r, sh, d: r.choice([-3, -2, 1, 2, 5], size=sh).astype(np.int64),
           "x": lambda r, sh, d: r.integers(-20, 20, size=sh).astype(np.int64)})
x, y = inp("x", (s, 4), BOOL), inp("y", (4,), BOOL)
case("bin_eq_bool", [x, y], node(Op.EQ, [x, y]), S_ONLY)
x, y = inp("x", (s, 4), F16), inp("y", (s, 4), F16)
case("bin_lt_f16", [x, y], node(Op.LT, [x, y]), S_ONLY)
x = inp("x", (s, 3))
case("bin_const", [x], node(Op.MUL, [node(Op.ADD, [x, node(Op.CONST, [], ConstAttrs(2.5, F32))]),
                                      node(Op.CONST, [], ConstAttrs(-1.0, F32))]), S_ONLY)

c, x, y = inp("c", (s, 1), BOOL), inp("x", (s, 6)), inp("y", (6,), F16)
case("where", [c, x, y], node(Op.WHERE, [c, x, y]), S_ONLY)

# ---- reductions and scans ---------------------------------------------------------------
for op in (Op.SUM, Op.MEAN, Op.MAX, Op.MIN):
    for axes, keep in [((2,), False), ((1,), True), ((0, 2), False), ((0, 1, 2), True)]:
        x = inp("x", (b, s, 6))
        case(f"red_{op.name.lower()}_{'_'.join(map(str, axes))}_{int(keep)}", [x],
             node(op, [x], ReduceAttrs(axes, keep)), rtol=1e-5, atol=1e-5)
x = inp("x", (b, s, 6))
case("red_sum_all", [x], node(Op.SUM, [x], ReduceAttrs((0, 1, 2), False)))
x = inp("x", (s, 33), F16)
case("red_sum_f16", [x], node(Op.SUM, [x], ReduceAttrs((1,), False)), S_ONLY, rtol=2e-3, atol=2e-2)
x = inp("x", (s, 5), I64)
case("red_sum_i64", [x], [node(Op.SUM, [x], ReduceAttrs((1,), False)), node(Op.MAX, [x], ReduceAttrs((0,), True))],
     S_ONLY)
x = inp("x", (b, s))
case("cumsum_f32", [x], node(Op.CUMSUM, [x], AxisAttrs(1)))
x = inp("x", (b, s), BOOL)
case("cumsum_bool", [x], node(Op.CUMSUM, [x], AxisAttrs(1)))
x = inp("x", (s, 4), I64)
case("cumsum_i64_axis0", [x], node(Op.CUMSUM, [x], AxisAttrs(0)), S_ONLY)
x = inp("x", (b, 3, s))
case("softmax_last", [x], node(Op.SOFTMAX, [x], AxisAttrs(2)), gens={"x": lambda r, sh, d: (
    r.standard_normal(sh) * 5).astype(np.float32)})
x = inp("x", (b, s, 3))
case("softmax_mid", [x], node(Op.SOFTMAX, [x], AxisAttrs(1)))
x = inp("x", (s, 20), F16)
case("softmax_f16", [x], node(Op.SOFTMAX, [x], AxisAttrs(1)), S_ONLY, rtol=2e-3, atol=1e-3)

# ---- matmul -------------------------------------------------------------------------------
x, w = inp("x", (s, 24)), inp("w", (24, 64))
case("mm_2d", [x, w], node(Op.MATMUL, [x, w]), S_ONLY, rtol=1e-4, atol=1e-4)
x, w = inp("x", (b, s, 24)), inp("w", (24, 20))
case("mm_3d_weight_n20", [x, w], node(Op.MATMUL, [x, w]), rtol=1e-4, atol=1e-4)
x, w = inp("x", (b, 2, s, 8)), inp("w", (b, 2, 8, t))
case("mm_batched_sym_n", [x, w], node(Op.MATMUL, [x, w]), ({"b": 1, "s": 3, "t": 5}, {"b": 2, "s": 9, "t": 18}),
     rtol=1e-4, atol=1e-4)
x, w = inp("x", (b, 1, s, 8)), inp("w", (3, 8, 16))
case("mm_broadcast_batch", [x, w], node(Op.MATMUL, [x, w]), rtol=1e-4, atol=1e-4)
x, w = inp("x", (s, 7), F16), inp("w", (7, 32), F16)
case("mm_f16", [x, w], node(Op.MATMUL, [x, w]), S_ONLY, rtol=2e-3, atol=2e-3)
x, w = inp("x", (s, 600)), inp("w", (600, 48))
case("mm_k_blocked", [x, w], node(Op.MATMUL, [x, w]), ({"s": 1}, {"s": 70}), rtol=1e-4, atol=1e-4)
x, w = inp("x", (s, 40), BF16), inp("w", (40, 16), BF16)
case("mm_bf16", [x, w], node(Op.MATMUL, [x, w]), S_ONLY, rtol=2e-2, atol=5e-2)
x, w = inp("x", (8, 32)), inp("w", (32, 64))
case("mm_static_direct", [x, w], node(Op.MATMUL, [x, w]), rtol=1e-4, atol=1e-4)
x, w = inp("x", (5, 6), I64), inp("w", (6, 3), I64)
case("mm_i64_static", [x, w], node(Op.MATMUL, [x, w]))

# ---- data movement ------------------------------------------------------------------------
x = inp("x", (b * s, 12))
case("reshape_split", [x, inp("bind", (b, s))], node(Op.RESHAPE, [x], ShapeAttrs((b, s, 3, 4))))
x = inp("x", (b, s, 4, 3))
case("reshape_merge", [x], node(Op.RESHAPE, [x], ShapeAttrs((b * s, 12))))
x = inp("x", (6, s))
case("reshape_mixed", [x], node(Op.RESHAPE, [x], ShapeAttrs((3, 2 * s))), S_ONLY)
x = inp("x", (s, 1, 4))
case("reshape_unit_dims", [x], node(Op.RESHAPE, [x], ShapeAttrs((1, s, 4, 1))), S_ONLY)
x = inp("x", (b, s, 3, 4))
case("permute", [x], node(Op.PERMUTE, [x], PermuteAttrs((0, 2, 1, 3))))
x = inp("x", (s, 1, 3))
case("expand", [x], node(Op.EXPAND, [x], ShapeAttrs((2, s, 4, 3))), S_ONLY)
x = inp("x", (b, s, 8))
case("slice_static", [x], [node(Op.SLICE, [x], SliceAttrs(2, 1, 7, 2)), node(Op.SLICE, [x], SliceAttrs(2, 4, 8))])
x = inp("x", (b, s + 3, 4))
case("slice_symbolic", [x, inp("bind", (s,))], node(Op.SLICE, [x], SliceAttrs(1, 2, s + 1)))
x, y, z = inp("x", (b, s, 2)), inp("y", (b, 3, 2), F16), inp("z", (b, s, 2))
case("concat", [x, y, z], node(Op.CONCAT, [x, y, z], AxisAttrs(1)))
tab, ids = inp("tab", (11, 6)), inp("ids", (b, s), I64)
case("take_embed", [tab, ids], node(Op.TAKE, [tab, ids], AxisAttrs(0)), gens={"ids": indices(11, -11)})
x, ids = inp("x", (b, 5, 3)), inp("ids", (s,), I32)
case("take_axis1", [x, ids], node(Op.TAKE, [x, ids], AxisAttrs(1)), gens={"ids": indices(5)})
x, i0, i1 = inp("x", (4, 5, 3)), inp("i0", (s, 1), I64), inp("i1", (2,), I64)
case("index", [x, i0, i1], node(Op.INDEX, [x, i0, i1]), S_ONLY, gens={"i0": indices(4, -4), "i1": indices(5)})
x, ix = inp("x", (b, 6)), inp("ix", (b, s), I64)
case("gather", [x, ix], node(Op.GATHER, [x, ix], AxisAttrs(1)), gens={"ix": indices(6)})
x = inp("x", (s,))
case("arange", [x], [node(Op.ADD, [x, node(Op.ARANGE, [], ArangeAttrs(0, s, 1, F32))]),
                     node(Op.ARANGE, [], ArangeAttrs(2, s + 2, 1, I64))], S_ONLY)
x = inp("x", (s, 2))
case("arange_step_full", [x], [node(Op.ARANGE, [], ArangeAttrs(1, 10, 3, I64)),
                               node(Op.ADD, [x, node(Op.FULL, [], FullAttrs((s, 2), 1.5, F32))]),
                               node(Op.FULL, [], FullAttrs((2, s), True, BOOL))], S_ONLY)

# ---- norms and attention ----------------------------------------------------------------
x, w, bb = inp("x", (b, s, 32)), inp("w", (32,)), inp("bb", (32,))
case("layer_norm", [x, w, bb], node(Op.LAYER_NORM, [x, w, bb], NormAttrs(1e-5)),
     gens={"x": lambda r, sh, d: (r.standard_normal(sh) * 3 + 2).astype(np.float32)})
x, w = inp("x", (b, s, 48)), inp("w", (48,))
case("rms_norm", [x, w], node(Op.RMS_NORM, [x, w], NormAttrs(1e-6)))
x, w = inp("x", (s, 40), F16), inp("w", (40,), F16)
case("rms_norm_f16", [x, w], node(Op.RMS_NORM, [x, w], NormAttrs(1e-6)), S_ONLY, rtol=2e-3, atol=2e-3)

x, w = inp("x", (s, 32), BF16), inp("w", (32,), BF16)
case("rms_norm_bf16", [x, w], node(Op.RMS_NORM, [x, w], NormAttrs(1e-6)), S_ONLY, rtol=2e-2, atol=2e-2)

ATT_SIZES = ({"b": 1, "s": 3, "t": 3}, {"b": 2, "s": 7, "t": 19})


def att(name, q, k, v, mask=None, causal=False, scale=None, sizes=ATT_SIZES, **kw):
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[3])
    out = node(Op.ATTENTION, inputs, AttentionAttrs(scale, causal, mask is not None))
    kw.setdefault("rtol", 1e-4)
    kw.setdefault("atol", 1e-5)
    return case(name, inputs, out, sizes, **kw)


att("attn_plain", inp("q", (b, 4, s, 16)), inp("k", (b, 4, t, 16)), inp("v", (b, 4, t, 16)))
att("attn_causal_gqa", inp("q", (b, 4, s, 16)), inp("k", (b, 2, t, 16)), inp("v", (b, 2, t, 8)), causal=True,
    sizes=({"b": 1, "s": 4, "t": 4}, {"b": 2, "s": 3, "t": 11}))
att("attn_bool_mask", inp("q", (b, 2, s, 8)), inp("k", (b, 2, t, 8)), inp("v", (b, 2, t, 8)),
    mask=inp("m", (b, 1, 1, t), BOOL), gens={"m": lambda r, sh, d: r.random(sh) < 0.3})  # some rows fully masked
att("attn_float_mask_causal", inp("q", (b, 2, s, 8)), inp("k", (b, 2, t, 8)), inp("v", (b, 2, t, 8)),
    mask=inp("m", (s, t)), causal=True, sizes=({"b": 1, "s": 5, "t": 5}, {"b": 2, "s": 2, "t": 9}),
    gens={"m": lambda r, sh, d: np.where(r.random(sh) < 0.2, -np.inf, r.standard_normal(sh)).astype(np.float32)})
att("attn_static_unpadded", inp("q", (2, 2, 16, 8)), inp("k", (2, 2, 32, 8)), inp("v", (2, 2, 32, 8)), causal=True,
    sizes=({},))
att("attn_f16", inp("q", (b, 2, s, 32), F16), inp("k", (b, 2, t, 32), F16), inp("v", (b, 2, t, 32), F16),
    causal=True, rtol=2e-3, atol=2e-3, sizes=({"b": 1, "s": 6, "t": 6}, {"b": 2, "s": 1, "t": 30}))


@pytest.fixture(scope="module")
def ex():
    return build_cases(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_op(ex, c):
    run_case(ex, c)
