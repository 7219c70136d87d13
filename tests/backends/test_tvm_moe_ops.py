"""TOPK and ROUTED_MATMUL: TE rules built for llvm against the numpy reference (and the
reference against torch), and the property the routed kernel exists for: each row reads
only the expert its id picks (checked in the scheduled TIR and by poisoning the others)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import node, sym
from llmc.compiler.ops import AxisAttrs, Op, RoutedMatmulAttrs, TopkAttrs
from llmc.compiler.reference import run_op, topk_reference

from tvm_cases import Case, build_cases, indices, inp, run_case

b, s = sym("b"), sym("s")
S_ONLY = ({"s": 1}, {"s": 3}, {"s": 37})
BS = ({"b": 1, "s": 1}, {"b": 2, "s": 9})
F32, F16, I64, I32 = DType.F32, DType.F16, DType.I64, DType.I32

CASES: list[Case] = []


def case(name, inputs, outputs, sizes=S_ONLY, **kw) -> Case:
    c = Case(name, inputs, outputs if isinstance(outputs, (list, tuple)) else [outputs], sizes, **kw)
    CASES.append(c)
    return c


def _ties(rng, shape, dtype):
    return rng.integers(0, 3, size=shape).astype(dtype.numpy)  # many equal values per row


def _with_nan(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype.numpy)
    x[rng.random(shape) < 0.25] = np.nan
    return x


# ---- TOPK ---------------------------------------------------------------------------------
x = inp("x", (s, 8))
case("topk_largest", [x], node(Op.TOPK, [x], TopkAttrs(2, 1)))
x = inp("x", (s, 60))
case("topk_4_of_60", [x], node(Op.TOPK, [x], TopkAttrs(4, 1)))
x = inp("x", (s, 8))
case("topk_smallest", [x], node(Op.TOPK, [x], TopkAttrs(3, 1, largest=False)))
x = inp("x", (6, b, s))
case("topk_axis0", [x], node(Op.TOPK, [x], TopkAttrs(2, 0)), BS)
x = inp("x", (s, 8))
case("topk_ties", [x], node(Op.TOPK, [x], TopkAttrs(3, 1)), gens={"x": _ties})
x = inp("x", (s, 8))
case("topk_nan", [x], [node(Op.TOPK, [x], TopkAttrs(3, 1)), node(Op.TOPK, [x], TopkAttrs(3, 1, largest=False))],
     gens={"x": _with_nan})
x = inp("x", (s, 8), F16)
case("topk_f16", [x], node(Op.TOPK, [x], TopkAttrs(2, 1)))
x = inp("x", (s, 8), I32)
case("topk_int", [x], node(Op.TOPK, [x], TopkAttrs(2, 1)), gens={"x": _ties})
x = inp("x", (s, 8))
i = node(Op.TOPK, [x], TopkAttrs(2, 1))
case("topk_values", [x], [node(Op.GATHER, [x, i], AxisAttrs(1))])  # how the frontend forms torch.topk's values

# ---- ROUTED_MATMUL ------------------------------------------------------------------------
x, w, ids = inp("x", (s, 16)), inp("w", (6, 24, 16)), inp("ids", (s,), I64)
case("routed_nk", [x, w, ids], node(Op.ROUTED_MATMUL, [x, w, ids], RoutedMatmulAttrs(True)),
     gens={"ids": indices(6)}, rtol=1e-5, atol=1e-5)
x, w, ids = inp("x", (b, s, 16)), inp("w", (5, 16, 12)), inp("ids", (b, s), I64)
case("routed_kn_2d_rows", [x, w, ids], node(Op.ROUTED_MATMUL, [x, w, ids], RoutedMatmulAttrs(False)), BS,
     gens={"ids": indices(5)})
x, w, ids = inp("x", (s, 16)), inp("w", (4, 8, 16), F16), inp("ids", (s,), I32)
case("routed_f16_weights_i32_ids", [x, w, ids], node(Op.ROUTED_MATMUL, [x, w, ids], RoutedMatmulAttrs(True)),
     gens={"ids": indices(4)}, rtol=1e-3, atol=1e-3)
x, w, ids = inp("x", (s, 16)), inp("w", (6, 24, 16)), inp("ids", (s,), I64)
case("routed_negative_ids", [x, w, ids], node(Op.ROUTED_MATMUL, [x, w, ids], RoutedMatmulAttrs(True)),
     gens={"ids": indices(0, -6)})  # numpy's wrap, like INDEX


@pytest.fixture(scope="module")
def ex():
    return build_cases(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_op(ex, c):
    run_case(ex, c)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_reference_matches_torch(largest):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7, 9)).astype(np.float32)
    for axis in range(3):
        ref = torch.topk(torch.from_numpy(x), 3, dim=axis, largest=largest).indices.numpy()
        np.testing.assert_array_equal(topk_reference(x, 3, axis, largest), ref)
    x[0, 0, 2] = np.nan  # torch: NaN is the largest value
    got = topk_reference(x, 2, 2, largest)[0, 0]
    assert (got[0] == 2) if largest else (2 not in got)


def test_routed_matmul_reference_matches_torch():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 16)).astype(np.float32)
    w = rng.standard_normal((6, 24, 16)).astype(np.float32)
    ids = rng.integers(0, 6, 10)
    want = torch.bmm(torch.from_numpy(w)[ids], torch.from_numpy(x)[:, :, None])[:, :, 0].numpy()
    got = node(Op.ROUTED_MATMUL, [inp("x", (10, 16)), inp("w", (6, 24, 16)), inp("i", (10,), I64)],
               RoutedMatmulAttrs(True))
    np.testing.assert_allclose(run_op(Op.ROUTED_MATMUL, got.attrs, [x, w, ids], {}, got.dtype), want, rtol=1e-5,
                               atol=1e-5)


def _by_name(name):
    return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize("rows", [1, 2, 40])
def test_routed_kernel_reads_only_the_chosen_experts(ex, rows):
    """Experts no row picks hold NaN: a kernel that touched them (a dense, masked MoE) would
    give NaN; the routed kernel gives the reference result computed without them."""
    c = _by_name("routed_nk")
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    w = rng.standard_normal((6, 24, 16)).astype(np.float32)
    ids = rng.choice([1, 4], size=rows).astype(np.int64)
    want = np.einsum("sk,snk->sn", x.astype(np.float64), w[ids].astype(np.float64))
    w[[0, 2, 3, 5]] = np.nan
    args = {"x": x, "w": w, "ids": ids}
    out = np.zeros((rows, 24), np.float32)
    ex.mod[c.name](*[args[p.attrs.name] for p in c.kernel.params], out, rows)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_routed_tir_addresses_weights_through_the_id():
    """In the scheduled TIR every read of the expert weights is indexed by a loaded id, and
    no loop runs over the experts axis."""
    from llmc.backends.lower import lower_kernel
    from llmc.backends.schedule import cpu_info, schedule_func

    c = _by_name("routed_nk")
    params = [p.attrs.name for p in c.kernel.params]
    wbuf, idbuf = f"in{params.index('w')}", f"in{params.index('ids')}"
    func, _ = schedule_func(lower_kernel(c.kernel), cpu_info({"mcpu": "x86-64"}))
    body = func.script().split("T.func_attr", 1)[1]
    reads = [ln for ln in body.splitlines() if re.search(rf"\b{wbuf}\[", ln) and "T.reads" not in ln]
    assert reads, body
    for ln in reads:
        for m in re.finditer(rf"\b{wbuf}\[", ln):
            first_index = ln[m.end():].split(",")[0]
            assert f"{idbuf}[" in first_index, ln
    assert not re.search(r"range\(T\.int64\(6\)\)", body), body  # no loop over the 6 experts


@pytest.mark.parametrize("target", ["cuda:sm_90", "rocm:gfx942", "metal"])
def test_gpu_targets_schedule_the_moe_kernels(target):
    """CUDA/ROCm/Metal builds take these kernels through TVM (dlight's Fallback rule: a
    thread per output element, each reading its row's expert); every one gets thread
    bindings, so no build falls back to a host loop. (Scheduled here, not run on a GPU.)"""
    from llmc.backends.gpu_schedule import schedule_gpu_func
    from llmc.backends.targets import parse_target

    spec = parse_target(target)
    if spec.kind == "cuda":
        from llmc.backends.build_cuda import cuda_target as make
    else:
        from llmc.backends import build_gpu_targets as gt
        make = gt.rocm_target if spec.kind == "rocm" else gt.metal_target
    from llmc.backends.lower import lower_kernel

    tgt = make(spec)
    with tgt:
        for name in ("topk_4_of_60", "topk_axis0", "routed_nk", "routed_kn_2d_rows"):
            func = schedule_gpu_func(lower_kernel(_by_name(name).kernel), tgt, name=name)
            assert "threadIdx.x" in func.script(), name
