"""backends/cuda/fused_gemm.py without a GPU: which groups take in the norm before a GEMM and the
SwiGLU after it, the route each merged kernel gets, and the cases left as they were."""
import numpy as np
import pytest
import torch

from llmc.api import CompileOptions, capture
from llmc.backends.build_cuda import build_program
from llmc.backends.cuda.fused_gemm import FUSED_FUNC, fuse_gemm_neighbours
from llmc.backends.cuda.routes import cuda_grouping, match_route
from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.frontend.hf_models import tiny_model
from llmc.compiler.ir import Graph, TensorType
from llmc.compiler.ops import NormAttrs, Op, PermuteAttrs, SliceAttrs
from llmc.passes.gemm_weight_layout import transpose_gemm_weights

BOUNDS = {"batch": (1, 2), "seq": (1, 32)}


def _ops(group):
    return [n.op for n in group if n.op is not Op.CONST]


def _mlp_graph(residual: bool = False, norm_users: int = 1, out_of_silu: bool = False):
    """x -> RMSNorm -> x @ W^T (W [2F, K]) -> silu(first half) * second half [-> + x]."""
    k, f = 16, 24
    x = ir.input_node("x", TensorType((3, k), DType.BF16))
    g = ir.weight_node("g", TensorType((k,), DType.BF16))
    w = ir.weight_node("w", TensorType((2 * f, k), DType.BF16))
    n = ir.node(Op.RMS_NORM, [x, g], NormAttrs(1e-5))
    h = ir.node(Op.MATMUL, [n, ir.node(Op.PERMUTE, [w], PermuteAttrs((1, 0)))])
    gate = ir.node(Op.SLICE, [h], SliceAttrs(axis=1, start=0, end=f, step=1))
    up = ir.node(Op.SLICE, [h], SliceAttrs(axis=1, start=f, end=2 * f, step=1))
    s = ir.node(Op.SILU, [gate])
    y = ir.node(Op.MUL, [s, up])
    outs = [y]
    if residual:
        w2 = ir.weight_node("w2", TensorType((k, f), DType.BF16))
        y = ir.node(Op.ADD, [ir.node(Op.MATMUL, [y, ir.node(Op.PERMUTE, [w2], PermuteAttrs((1, 0)))]), x])
        outs = [y]
    if norm_users > 1:
        outs.append(ir.node(Op.ADD, [n, n]))
    if out_of_silu:
        outs.append(s)
    rng = np.random.default_rng(0)
    params = {"g": rng.standard_normal(k).astype(np.float32), "w": rng.standard_normal((2 * f, k)).astype(np.float32),
              "w2": rng.standard_normal((k, f)).astype(np.float32)}
    return Graph((x,), tuple(outs), {p: v for p, v in params.items() if p != "w2" or residual}, {})


def test_norm_and_swiglu_join_the_gemm():
    graph = _mlp_graph()
    before = [_ops(g) for g in cuda_grouping(graph)]
    after = [_ops(g) for g in cuda_grouping(graph, fuse_gemv=True)]
    assert [Op.RMS_NORM] in before and any(Op.SILU in g and Op.MATMUL not in g for g in before)
    assert len(after) == 1 and sorted(after[0], key=lambda o: o.value) == sorted(
        [Op.RMS_NORM, Op.PERMUTE, Op.MATMUL, Op.SLICE, Op.SILU, Op.SLICE, Op.MUL], key=lambda o: o.value)


def test_a_residual_keeps_the_swiglu_apart():
    """gate/up -> SwiGLU -> down + x: the down GEMM takes its residual, the SwiGLU joins gate/up."""
    after = [set(_ops(g)) for g in cuda_grouping(_mlp_graph(residual=True), fuse_gemv=True)]
    assert {Op.RMS_NORM, Op.PERMUTE, Op.MATMUL, Op.SLICE, Op.SILU, Op.MUL} in after
    assert {Op.PERMUTE, Op.MATMUL, Op.ADD} in after and len(after) == 2


@pytest.mark.parametrize("case", ["norm_read_twice", "silu_is_an_output"])
def test_neighbours_stay_apart_when_others_read_them(case):
    graph = _mlp_graph(norm_users=2) if case == "norm_read_twice" else _mlp_graph(out_of_silu=True)
    after = [_ops(g) for g in cuda_grouping(graph, fuse_gemv=True)]
    if case == "norm_read_twice":  # the norm's value is needed elsewhere: it stays out of the GEMM's kernel
        assert not any(Op.RMS_NORM in g and Op.MATMUL in g for g in after)
        assert any(Op.SILU in g and Op.MATMUL in g for g in after)
    else:  # the SwiGLU's inner value is a graph output: it stays a TVM kernel of its own
        assert any(Op.RMS_NORM in g and Op.MATMUL in g and Op.SILU not in g for g in after)


def test_a_k_n_weight_is_not_fused():
    """Without the [N, K] layout (tensor-parallel ranks keep theirs) the groups are as before."""
    k = 16
    x = ir.input_node("x", TensorType((3, k), DType.BF16))
    g = ir.weight_node("g", TensorType((k,), DType.BF16))
    w = ir.weight_node("w", TensorType((k, 32), DType.BF16))
    y = ir.node(Op.MATMUL, [ir.node(Op.RMS_NORM, [x, g], NormAttrs(1e-5)), w])
    graph = Graph((x,), (y,), {"g": np.ones(k, np.float32), "w": np.ones((k, 32), np.float32)}, {})
    assert [_ops(gr) for gr in cuda_grouping(graph, fuse_gemv=True)] == [_ops(gr) for gr in cuda_grouping(graph)]


def test_transpose_gemm_weights_moves_half_precision_weights_when_asked():
    k = 16
    x = ir.input_node("x", TensorType((3, k), DType.BF16))
    w = ir.weight_node("w", TensorType((k, 8), DType.BF16))
    graph = Graph((x,), (ir.node(Op.MATMUL, [x, w]),), {"w": np.arange(k * 8, dtype=np.float32).reshape(k, 8)}, {})
    same, report = transpose_gemm_weights(graph)  # default: float32 only (the CPU GEMM's layout)
    assert report.counts["transposed"] == 0
    moved, report = transpose_gemm_weights(graph, frozenset({DType.BF16}))
    assert report.counts["transposed"] == 1
    (wt,) = [n for n in moved.nodes() if n.op is Op.WEIGHT]
    assert tuple(wt.shape) == (8, k)
    np.testing.assert_array_equal(moved.params[wt.attrs.name], graph.params["w"].T)


def test_llama_layer_routes_and_runs_on_the_cpu():
    """A tiny bf16 Llama's CUDA program: per layer, the QKV and gate/up GEMMs are one fused call
    each (norm in; SwiGLU in), and the final norm joins the LM head; 6 kernels a layer, and the
    same program built for the CPU (TVM lowers the merged groups as one kernel) matches torch eager."""
    from llmc.backends.artifact import build_manifest, weights_of
    from llmc.backends.build import build_kernels, default_target
    from llmc.backends.lower import describe_kernel
    from llmc.backends.targets import parse_target
    from llmc.runtime.executor import Executor
    from llmc.runtime.manifest import Manifest

    model, kw = tiny_model("llama")
    model = model.to(torch.bfloat16)
    kw.pop("attention_mask")
    graph = capture(model, (), kw, CompileOptions(dim_bounds=BOUNDS))
    prog, _ = build_program(graph)
    routes = [match_route(prog.kernels[c.kernel]) for c in prog.calls]
    fused = [r for r in routes if r and r.func == FUSED_FUNC]
    layers = model.config.num_hidden_layers
    assert len(fused) == 2 * layers + 1
    qkv = [r for r in fused if r.scalars[0] == 0]  # the last one: final norm -> LM head
    mlp = [r for r in fused if r.scalars[0] == 1]
    assert len(qkv) == layers + 1 and len(mlp) == layers
    assert qkv[-1].tensors[5][1][-1] == model.config.vocab_size
    for r in fused:
        x, g, w, b, res, y = r.tensors
        assert g is not None and b is None and res is None and w[1][1] == x[1][-1]  # W [N, K]
        assert abs(r.scalars[1] - model.config.rms_norm_eps) < 1e-12
    assert all(r.tensors[5][1][-1] == model.config.intermediate_size for r in mlp)
    unfused = build_program(graph, fuse_gemv=False)[0]
    assert len(unfused.calls) - len(prog.calls) == 3 * layers + 1  # two norms and a SwiGLU a layer, the final norm
    ex = build_kernels(prog.kernels, default_target())
    run = Executor(Manifest.from_json(build_manifest(prog, parse_target("llvm"), 0, describe_kernel)), ex.mod,
                   weights_of(prog))
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float().numpy()
    got = run(input_ids=ids.numpy())[0].astype(np.float32)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


def test_fuse_gemm_neighbours_is_pure():
    graph = _mlp_graph()
    groups = cuda_grouping(graph)
    snapshot = [[n.uid for n in g] for g in groups]
    fuse_gemm_neighbours(graph, groups)
    assert [[n.uid for n in g] for g in groups] == snapshot


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_llama_layer_routes_and_matches_the_cpu_program(quant):
    """A tiny bf16 Llama quantized weight-only: per layer, norm+QKV, O projection+residual,
    norm+gate/up+SwiGLU and down+residual are one llmc_qgemv_fused call each; the program built
    for the CPU (TVM lowers the merged groups) computes what the CPU compilation of the same
    quantized model computes."""
    from llmc.api import compile_graph
    from llmc.backends.artifact import build_manifest, weights_of
    from llmc.backends.build import build_kernels, default_target
    from llmc.backends.cuda.fused_gemm import QFUSED_FUNC
    from llmc.backends.lower import describe_kernel
    from llmc.backends.targets import parse_target
    from llmc.passes.quant.scheme import QuantScheme
    from llmc.runtime.executor import Executor
    from llmc.runtime.manifest import Manifest

    model, kw = tiny_model("llama")
    model = model.to(torch.bfloat16)
    kw.pop("attention_mask")
    opts = CompileOptions(dim_bounds=BOUNDS, quant=QuantScheme(quant, group=32))
    prog, _ = build_program(capture(model, (), kw, opts), opts.pipeline())
    routes = [match_route(prog.kernels[c.kernel]) for c in prog.calls]
    fused = [r for r in routes if r and r.func == QFUSED_FUNC]
    layers = model.config.num_hidden_layers
    assert len(fused) == 4 * layers and not any(r and r.func == "llmc_qgemv" for r in routes)
    kinds = sorted((r.tensors[1] is not None, r.scalars[2], r.tensors[5] is not None) for r in fused)
    assert kinds == sorted([(False, 0, True)] * 2 * layers + [(True, 0, False)] * layers + [(True, 1, False)] * layers)
    for r in fused:
        x, g, qw, s, z, res, y = r.tensors
        assert r.scalars[0] == int(quant[3:]) and r.scalars[1] == (32 if quant == "int4" else x[1][-1]) and s[1][0] == qw[1][0] and (z is None or z[1] == s[1])
        assert y[1][-1] == (qw[1][0] // 2 if r.scalars[2] else qw[1][0])
    assert not any(Op.RMS_NORM in [n.op for n in prog.kernels[c.kernel].body] and
                   Op.QMATMUL not in [n.op for n in prog.kernels[c.kernel].body]
                   and Op.MATMUL not in [n.op for n in prog.kernels[c.kernel].body] for c in prog.calls)
    ex = build_kernels(prog.kernels, default_target())
    run = Executor(Manifest.from_json(build_manifest(prog, parse_target("llvm"), 0, describe_kernel)), ex.mod,
                   weights_of(prog))
    cpu = compile_graph(capture(model, (), kw, opts), opts)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(5)).numpy()
    got = run(input_ids=ids)[0].astype(np.float32)
    want = cpu(input_ids=ids)[0].astype(np.float32)
    # both round bf16 intermediates at different kernel boundaries (the merged kernels keep the
    # norm's output and the gate/up products in float): a few percent apart on a random tiny model
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2
