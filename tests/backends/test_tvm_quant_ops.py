"""QMATMUL: the TE rule built for llvm against the numpy reference (packed int8 / int4
weights, symmetric and asymmetric, f32 and bf16, 2-D and 3-D activations, ragged N), and
the reference against a torch matmul with the weights dequantized by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import node, sym
from llmc.compiler.ops import Op, QMatmulAttrs
from llmc.compiler.reference import run_op

from tvm_cases import Case, build_cases, inp, run_case

s, b = sym("s"), sym("b")
F32, BF16, I8, U8 = DType.F32, DType.BF16, DType.I8, DType.U8
CASES: list[Case] = []


def _codes(lo, hi):
    return lambda rng, shape, dtype: rng.integers(lo, hi, size=shape).astype(dtype.numpy)


def _scales(rng, shape, dtype):
    return (rng.random(shape) * 0.05 + 0.01).astype(dtype.numpy)


def _zeros(rng, shape, dtype):
    return rng.integers(0, 16, size=shape).astype(dtype.numpy)


def _float8(rng, shape, dtype):  # e4m3 bit patterns of values spread over its range (no NaN codes)
    from llmc.compiler.quant_layout import float8_codes

    return float8_codes(rng.standard_normal(shape) * np.exp(rng.uniform(-6, 5, shape)))


def case(name, x_shape, n, k, bits, group, sym_, dtype=F32, sizes=({"s": 1}, {"s": 7}, {"s": 33}), act_bits=0,
         float8=False, **kw):
    x = inp("x", x_shape, dtype)
    qw = inp("qw", (n, k if bits == 8 else k // 2), I8 if bits == 8 and not float8 else U8)
    sc = inp("sc", (n, k // group), dtype)
    ins = [x, qw, sc] + ([] if sym_ else [inp("zp", (n, k // group), dtype)])
    if act_bits:  # the rows' scales, as the quantize pass computes them before the op
        from llmc.passes.quantize import row_scale_nodes

        y = node(Op.QMATMUL, ins + [row_scale_nodes(x, "", 448.0 if float8 else 127.0)],
                 QMatmulAttrs(bits, group, sym_, dtype, act_bits, float8))
    else:
        y = node(Op.QMATMUL, ins, QMatmulAttrs(bits, group, sym_, dtype, act_bits))
    gens = {"qw": _float8 if float8 else _codes(-127, 128) if bits == 8 else _codes(0, 256), "sc": _scales,
            "zp": _zeros}
    CASES.append(Case(name, ins, [y], sizes, gens=gens, **kw))


case("q8_per_channel_3d", (1, s, 64), 48, 64, 8, 64, True)
case("q8_2d_rows_ragged_n", (s, 96), 50, 96, 8, 96, True)
case("q4_asym_g32", (1, s, 128), 64, 128, 4, 32, False)
case("q4_sym_g64_ragged_n", (s, 128), 40, 128, 4, 64, True)
case("q4_asym_batch", (b, s, 64), 32, 64, 4, 32, False, sizes=({"b": 2, "s": 5}, {"b": 1, "s": 1}))
case("q4_asym_bf16", (1, s, 64), 32, 64, 4, 32, False, BF16, rtol=2e-2, atol=2e-2)
case("q8_long_k_split", (1, s, 768), 32, 768, 8, 768, True, rtol=1e-4, atol=1e-4)
# W8A8: activations quantized per row at run time, integer products (rounding ties aside, exact)
case("w8a8_3d", (1, s, 64), 48, 64, 8, 64, True, act_bits=8, rtol=1e-5, atol=1e-5)
case("w8a8_2d_ragged_n", (s, 96), 50, 96, 8, 96, True, act_bits=8, rtol=1e-5, atol=1e-5)
case("w8a8_batch", (b, s, 128), 40, 128, 8, 128, True, act_bits=8, sizes=({"b": 2, "s": 5}, {"b": 1, "s": 1}),
     rtol=1e-5, atol=1e-5)
# FP8: e4m3 weight codes decoded from their bits, activations rounded to e4m3 per row (bit tricks
# in the kernel, ml_dtypes in the reference)
case("fp8_3d", (1, s, 64), 48, 64, 8, 64, True, act_bits=8, float8=True, rtol=1e-5, atol=1e-5)
case("fp8_2d_ragged_n", (s, 96), 50, 96, 8, 96, True, act_bits=8, float8=True, rtol=1e-5, atol=1e-5)



def qtake_case(name, ids_shape, n, k, bits, group, sym_, dtype=F32, **kw):
    """QTAKE: rows of a packed table picked by ids (a tied, quantized embedding)."""
    qw = inp("qw", (n, k if bits == 8 else k // 2), I8 if bits == 8 else U8)
    ids = inp("ids", ids_shape, DType.I64)
    sc = inp("sc", (n, k // group), dtype)
    ins = [qw, ids, sc] + ([] if sym_ else [inp("zp", (n, k // group), dtype)])
    y = node(Op.QTAKE, ins, QMatmulAttrs(bits, group, sym_, dtype))
    gens = {"qw": _codes(-127, 128) if bits == 8 else _codes(0, 256), "sc": _scales, "zp": _zeros,
            "ids": _codes(0, n)}
    CASES.append(Case(name, ins, [y], ({"s": 1}, {"s": 9}), gens=gens, **kw))


qtake_case("qtake_q4_asym_g32", (1, s), 50, 64, 4, 32, False)
qtake_case("qtake_q4_sym_g64", (s,), 37, 128, 4, 64, True)
qtake_case("qtake_q8", (1, s), 40, 48, 8, 48, True)
qtake_case("qtake_q4_bf16", (1, s), 30, 64, 4, 32, False, BF16, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def ex():
    return build_cases(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_op(ex, c):
    run_case(ex, c)


def test_qmatmul_kernels_get_the_matmul_schedule():
    """The dequantize is computed per output tile inside the GEMM schedule (not a fallback)."""
    from llmc.backends.lower import lower_kernel
    from llmc.backends.schedule import cpu_info, schedule_func

    for c in CASES[:4]:
        func, strategy = schedule_func(lower_kernel(c.kernel), cpu_info({"mcpu": "skylake-avx512"}))
        assert strategy == "matmul", (c.name, strategy)
    # W8A8 with its row scales as an input (as after partitioning: their reduction is its own kernel)
    x, xs = inp("x", (1, s, 64)), inp("xs", (1, s, 1))
    ins = [x, inp("qw", (48, 64), I8), inp("sc", (48, 1)), xs]
    w8 = Case("w8a8_alone", ins, [node(Op.QMATMUL, ins, QMatmulAttrs(8, 64, True, F32, 8))], ({"s": 3},))
    func, strategy = schedule_func(lower_kernel(w8.kernel), cpu_info({"mcpu": "skylake-avx512"}))
    assert strategy == "matmul", strategy


def test_reference_matches_torch_with_hand_dequantized_weights():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    q = rng.integers(0, 16, (24, 64))
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    sc = rng.random((24, 2)).astype(np.float32) * 0.1
    zp = rng.integers(0, 16, (24, 2)).astype(np.float32)
    w = (torch.tensor(q, dtype=torch.float64) - torch.tensor(zp).double().repeat_interleave(32, 1)) \
        * torch.tensor(sc).double().repeat_interleave(32, 1)
    want = (torch.tensor(x).double() @ w.T).float().numpy()
    got = run_op(Op.QMATMUL, QMatmulAttrs(4, 32, False, F32), [x, packed, sc, zp], {}, F32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_w8a8_reference_is_the_integer_product_of_per_row_codes():
    """The reference against torch: x quantized by hand per row (max|row| / 127), weights as
    codes, the exact integer product times both scales; and close to the float matmul."""
    rng = np.random.default_rng()
    x = rng.standard_normal((6, 96)).astype(np.float32) * rng.random((6, 1)).astype(np.float32) * 4
    q = rng.integers(-127, 128, (20, 96)).astype(np.int8)
    sc = (rng.random((20, 1)) * 0.02 + 0.001).astype(np.float32)
    xt = torch.tensor(x)
    sx = xt.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xt / sx).clamp(-127, 127).long()
    want = ((xq @ torch.tensor(q).long().T).double() * sx.double() * torch.tensor(sc).double().T).numpy()
    from llmc.compiler.quant_layout import row_scales

    got = run_op(Op.QMATMUL, QMatmulAttrs(8, 96, True, F32, 8), [x, q, sc, row_scales(x)], {}, F32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    exact = x.astype(np.float64) @ (q.astype(np.float64) * sc).T
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()  # per-row int8 rounding: ~1/254 of the range


def test_float8_round_and_decode_match_ml_dtypes_on_every_code():
    """The kernel's e4m3 decode of all 254 finite codes, and its rounding of values across the range
    (subnormals, ties between neighbours, up to 448), bit for bit against ml_dtypes, each built for
    llvm as one elementwise kernel."""
    import ml_dtypes
    import tvm
    from tvm import te

    from llmc.backends.te_rules_quant import float8_decode, float8_round
    from llmc.compiler.quant_layout import float8_codes

    def run(fn, arr, in_dtype):
        a = te.placeholder(arr.shape, in_dtype, name="a")
        out = te.compute(a.shape, lambda i: fn(a[i]), name="out")
        f = tvm.compile(te.create_prim_func([a, out]), target="llvm")
        res = tvm.runtime.tensor(np.zeros(arr.shape, np.float32))
        f(tvm.runtime.tensor(arr), res)
        return res.numpy()

    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], np.uint8)  # 0x7F, 0xFF: NaN
    values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(run(lambda b: float8_decode(b.astype("int32")), codes, "uint8"), values)
    rng = np.random.default_rng()
    grid = np.unique(values.astype(np.float64))
    v = np.concatenate([rng.standard_normal(4000) * np.exp(rng.uniform(-9, 6, 4000)), grid,
                        (grid[:-1] + grid[1:]) / 2]).astype(np.float32)  # the midpoints are ties
    v = v[np.abs(v) <= 448]
    np.testing.assert_array_equal(run(float8_round, v, "float32"),
                                  float8_codes(v).view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_w8a8_needs_per_channel_int8_weights():
    from llmc.errors import LLMCError

    x = inp("x", (s, 64))
    xs = inp("xs", (s, 1))
    with pytest.raises(LLMCError, match="act_bits"):
        node(Op.QMATMUL, [x, inp("q", (8, 32), U8), inp("s", (8, 2)), xs], QMatmulAttrs(4, 32, True, F32, 8))
    with pytest.raises(LLMCError, match="act_bits"):
        node(Op.QMATMUL, [x, inp("q", (8, 64), I8), inp("s", (8, 2)), xs], QMatmulAttrs(8, 32, True, F32, 8))
    with pytest.raises(LLMCError, match="rows' scales"):
        node(Op.QMATMUL, [x, inp("q", (8, 64), I8), inp("s", (8, 1))], QMatmulAttrs(8, 64, True, F32, 8))


def test_bad_operands_are_typed_errors():
    from llmc.errors import LLMCError

    x = inp("x", (s, 64))
    with pytest.raises(LLMCError, match="does not divide"):
        node(Op.QMATMUL, [x, inp("q", (8, 32), U8), inp("s", (8, 3))], QMatmulAttrs(4, 24, True, F32))
    with pytest.raises(LLMCError, match="qweight"):
        node(Op.QMATMUL, [x, inp("q", (8, 64), U8), inp("s", (8, 2))], QMatmulAttrs(4, 32, True, F32))
    with pytest.raises(LLMCError, match="zeros"):
        node(Op.QMATMUL, [x, inp("q", (8, 32), U8), inp("s", (8, 2))], QMatmulAttrs(4, 32, False, F32))
