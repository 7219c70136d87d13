"""Multi-node (fused) kernels: TE rules composed, injective stages inlined, the heavy
stage's schedule still applied. One tvm.compile for the module."""
from __future__ import annotations

import math

import pytest

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import node, sym
from llmc.compiler.ops import (AttentionAttrs, AxisAttrs, CastAttrs, ConstAttrs, GeluAttrs, NormAttrs, Op,
                               PermuteAttrs, ReduceAttrs, ShapeAttrs, SliceAttrs)

from tvm_cases import Case, build_cases, inp, run_case

b, s, t = sym("b"), sym("s"), sym("t")
BS = ({"b": 1, "s": 3}, {"b": 2, "s": 13})
F32, F16 = DType.F32, DType.F16
CASES: list[Case] = []
STRATEGY: dict[str, str] = {}  # case -> schedule strategy it must get


def case(name, inputs, outputs, sizes=BS, strategy=None, **kw) -> Case:
    c = Case(name, inputs, outputs if isinstance(outputs, (list, tuple)) else [outputs], sizes, **kw)
    CASES.append(c)
    if strategy:
        STRATEGY[name] = strategy
    return c


def const(v, dt=F32):
    return node(Op.CONST, [], ConstAttrs(v, dt))


# matmul + bias + gelu + residual
x, w, bias, res = inp("x", (b, s, 64)), inp("w", (64, 96)), inp("bias", (96,)), inp("res", (b, s, 96))
h = node(Op.ADD, [node(Op.GELU, [node(Op.ADD, [node(Op.MATMUL, [x, w]), bias])], GeluAttrs(False)), res])
case("mm_bias_gelu_res", [x, w, bias, res], h, strategy="matmul", rtol=1e-4, atol=1e-4)

# f16 linear with bias, tanh-gelu
x, w, bias = inp("x", (s, 48), F16), inp("w", (48, 32), F16), inp("bias", (32,), F16)
h = node(Op.GELU, [node(Op.ADD, [node(Op.MATMUL, [x, w]), bias])], GeluAttrs(True))
case("mm_f16_bias_gelu", [x, w, bias], h, ({"s": 5}, {"s": 21}), strategy="matmul", rtol=5e-3, atol=5e-3)

# matmul whose result is both an output and feeds an epilogue
x, w = inp("x", (b, s, 32)), inp("w", (32, 16))
y = node(Op.MATMUL, [x, w])
case("mm_two_outputs", [x, w], [y, node(Op.RELU, [y])], strategy="matmul", rtol=1e-4, atol=1e-4)

# QKV split-heads: matmul -> reshape -> permute
x, w = inp("x", (b * s, 64)), inp("w", (64, 96))
h = node(Op.PERMUTE, [node(Op.RESHAPE, [node(Op.MATMUL, [x, w])], ShapeAttrs((b, s, 3, 32)))], PermuteAttrs((0, 2, 1, 3)))
case("mm_split_heads", [x, w, inp("bind", (b, s))], h, strategy="matmul", rtol=1e-4, atol=1e-4)

# two chained matmuls in one kernel (no dedicated schedule: correctness only)
x, w1, w2 = inp("x", (s, 16)), inp("w1", (16, 24)), inp("w2", (24, 8))
case("mm_chain", [x, w1, w2], node(Op.MATMUL, [node(Op.MATMUL, [x, w1]), w2]), ({"s": 2}, {"s": 9}), rtol=1e-4,
     atol=1e-4)

# cast f16 -> f32, rms norm, cast back
x, w = inp("x", (b, s, 64), F16), inp("w", (64,))
h = node(Op.CAST, [node(Op.RMS_NORM, [node(Op.CAST, [x], CastAttrs(F32)), w], NormAttrs(1e-6))], CastAttrs(F16))
case("cast_rms_cast", [x, w], h, strategy="rows", rtol=2e-3, atol=2e-3)

# residual add (an output) + layer norm (another output)
x, r, w, bb = inp("x", (b, s, 48)), inp("r", (b, s, 48)), inp("w", (48,)), inp("bb", (48,))
hsum = node(Op.ADD, [x, r])
case("add_layer_norm", [x, r, w, bb], [hsum, node(Op.LAYER_NORM, [hsum, w, bb], NormAttrs(1e-5))], strategy="rows")

# scores * scale + mask -> softmax
x, m = inp("x", (b, 2, s, s)), inp("m", (b, 1, 1, s))
h = node(Op.SOFTMAX, [node(Op.ADD, [node(Op.MUL, [x, const(0.125)]), m])], AxisAttrs(3))
case("scale_mask_softmax", [x, m], h, strategy="rows")

# mean over the last axis then centre
x = inp("x", (b, s, 32))
h = node(Op.SUB, [x, node(Op.MEAN, [x], ReduceAttrs((2,), True))])
case("mean_centre", [x], h, strategy="rows")


# rotary embedding on q and k (slice / neg / concat / mul / add), then causal attention
def rotary(x, cos, sin, d):
    lo = node(Op.SLICE, [x], SliceAttrs(3, 0, d // 2))
    hi = node(Op.SLICE, [x], SliceAttrs(3, d // 2, d))
    rot = node(Op.CONCAT, [node(Op.NEG, [hi]), lo], AxisAttrs(3))
    return node(Op.ADD, [node(Op.MUL, [x, cos]), node(Op.MUL, [rot, sin])])


q, k, v = inp("q", (b, 4, s, 16)), inp("k", (b, 2, s, 16)), inp("v", (b, 2, s, 16))
cos, sin = inp("cos", (s, 16)), inp("sin", (s, 16))
att = node(Op.ATTENTION, [rotary(q, cos, sin, 16), rotary(k, cos, sin, 16), v], AttentionAttrs(0.25, True, False))
case("rotary_attention", [q, k, v, cos, sin], att, strategy="attention", rtol=1e-4, atol=1e-5)

# attention followed by the heads merge (permute + reshape) in the same kernel
q, k, v = inp("q", (b, 2, s, 8)), inp("k", (b, 2, s, 8)), inp("v", (b, 2, s, 8))
att = node(Op.ATTENTION, [q, k, v], AttentionAttrs(1 / math.sqrt(8), False, False))
merged = node(Op.RESHAPE, [node(Op.PERMUTE, [att], PermuteAttrs((0, 2, 1, 3)))], ShapeAttrs((b, s, 16)))
case("attention_merge_heads", [q, k, v], merged, strategy="attention", rtol=1e-4, atol=1e-5)

REPORT: dict = {}


@pytest.fixture(scope="module")
def ex():
    return build_cases(CASES, REPORT)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_fused(ex, c):
    run_case(ex, c)
    if c.name in STRATEGY:
        assert REPORT[c.name][1].startswith(STRATEGY[c.name]), f"{c.name} scheduled as {REPORT[c.name]}"


def test_describe(ex):
    assert REPORT["mm_bias_gelu_res"][0] == "matmul+add+gelu+add"
    assert REPORT["cast_rms_cast"][0] == "cast+rms_norm+cast"
