"""CPU GEMMs routed to the BLAS (backends/cpu_blas.py, runtime/blas.py): the grouping before
and after, the route of built kernels, and numerics against torch eager / numpy on fresh
random inputs (tolerance 1e-4 absolute, fp32)."""
import numpy as np
import pytest
import torch

import llmc
from llmc.backends.cpu_blas import cpu_grouping, match_blas
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import GeluAttrs, Op, PermuteAttrs
from llmc.compiler.program import lower_to_program
from llmc.compiler.symbolic import SymDim
from llmc.passes.partition import fused_grouping


def _linear_graph(dtype=DType.F32, tied=False, seed=0) -> Graph:
    """x [b, s, 16] -> x @ W1 + b1 -> GELU -> @ W2 (or @ E^T, a tied [40, 16] table) + x-ish residual."""
    rng = np.random.default_rng(seed)
    b, s = sym("batch"), sym("seq")
    np_dtype = np.float16 if dtype is DType.F16 else np.float32
    x = input_node("x", TensorType((b, s, 16), dtype))
    params = {"w1": rng.standard_normal((16, 32)) * 0.3, "b1": rng.standard_normal(32),
              "w2": rng.standard_normal((32, 16)) * 0.3, "emb": rng.standard_normal((40, 16)) * 0.3}
    params = {k: v.astype(np_dtype) for k, v in params.items()}
    w = {k: weight_node(k, TensorType(v.shape, dtype)) for k, v in params.items()}
    h = node(Op.ADD, [node(Op.MATMUL, [x, w["w1"]], where="up"), w["b1"]])
    h = node(Op.GELU, [h], GeluAttrs(False))
    h = node(Op.ADD, [node(Op.MATMUL, [h, w["w2"]], where="down"), x])
    outs = (h,)
    if tied:
        outs = (node(Op.MATMUL, [h, node(Op.PERMUTE, [w["emb"]], PermuteAttrs((1, 0)))], where="head"),)
    return Graph((x,), outs, params, {"batch": SymDim("batch", 1, 4), "seq": SymDim("seq", 1, 32)}, ("y",))


def _ops(groups):
    return [[n.op for n in g] for g in groups]


def test_grouping_before_after_splits_gemm_cores():
    g = _linear_graph(tied=True)
    before = _ops(fused_grouping(g))
    after = _ops(cpu_grouping(g))
    # before: each GEMM carries its epilogue (and the head its W^T prologue) in one TVM kernel
    assert before == [[Op.MATMUL, Op.ADD, Op.GELU], [Op.MATMUL, Op.ADD], [Op.PERMUTE, Op.MATMUL]]
    # after: each GEMM is alone (the head with its W^T, read transposed), epilogues are TVM kernels
    assert after == [[Op.MATMUL], [Op.ADD, Op.GELU], [Op.MATMUL], [Op.ADD], [Op.PERMUTE, Op.MATMUL]]


def test_grouping_leaves_non_blas_dtypes_and_batched_matmuls():
    assert _ops(cpu_grouping(_linear_graph(DType.F16))) == _ops(fused_grouping(_linear_graph(DType.F16)))
    b = sym("batch")
    q = input_node("q", TensorType((b, 4, 8), DType.F32))
    k = input_node("k", TensorType((b, 8, 4), DType.F32))
    g = Graph((q, k), (node(Op.MATMUL, [q, k]),), {}, {"batch": SymDim("batch", 1, 4)}, ("s",))
    assert _ops(cpu_grouping(g)) == [[Op.MATMUL]]
    assert all(match_blas(k) is None for k in lower_to_program(g, cpu_grouping).kernels.values())


def test_routes_of_built_kernels():
    p = lower_to_program(_linear_graph(tied=True), cpu_grouping)
    routes = {name: match_blas(k) for name, k in p.kernels.items()}
    blas = {n: r for n, r in routes.items() if r is not None}
    assert len(blas) == 3
    assert sorted(r.trans_b for r in blas.values()) == [0, 0, 1]
    head = next(r for r in blas.values() if r.trans_b)
    assert head.w[1] == (40, 16)  # the table as stored, [N, K]
    j = head.to_json()
    assert j["route"] == "blas" and j["func"] == "gemm" and len(j["tensors"]) == 3 and j["scalars"] == [1]
    assert all(r is None for n, r in routes.items() if n not in blas)


def _reference(g: Graph, x: np.ndarray) -> np.ndarray:
    p = g.params
    h = x @ p["w1"] + p["b1"]
    h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
    h = h @ p["w2"] + x
    return h @ p["emb"].T


@pytest.mark.parametrize("use_blas", [True, False])
def test_numerics_match_numpy_and_export(use_blas, tmp_path):
    from llmc.api import CompileOptions, compile_graph

    g = _linear_graph(tied=True, seed=3)
    cm = compile_graph(g, CompileOptions(use_blas=use_blas))
    routes = [k.get("route", "tvm") for k in cm.manifest["program"]["kernels"].values()]
    assert routes.count("blas") == (3 if use_blas else 0)
    rng = np.random.default_rng()
    for shape in [(1, 1, 16), (2, 7, 16), (4, 32, 16)]:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(cm(x)[0], _reference(g, x), atol=1e-4, rtol=1e-4)
    loaded = llmc.load(cm.export(tmp_path / "m.llmc"))
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(loaded(x)[0], _reference(g, x), atol=1e-4, rtol=1e-4)


def test_gpt2_tied_head_matches_torch():
    """A real (tiny, random) GPT2LMHeadModel: its tied LM head reads wte transposed in the BLAS."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=301, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ex = {"input_ids": torch.randint(0, 301, (2, 8)), "use_cache": False}
    cm = llmc.compile(model, (), ex, dim_bounds={"batch": (1, 4), "seq": (1, 64)})
    kernels = cm.manifest["program"]["kernels"].values()
    assert any(k.get("route") == "blas" and k["scalars"] == [1] for k in kernels)  # the tied head, W^T
    for shape in [(1, 1), (1, 13), (3, 64)]:
        ids = torch.randint(0, 301, shape)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.numpy()
        np.testing.assert_allclose(cm(input_ids=ids.numpy())[0], ref, atol=1e-4, rtol=1e-4)
