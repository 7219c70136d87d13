"""quantize: MATMUL(x, weight) -> QMATMUL over packed integers; before/after on hand-built
graphs (against the numpy interpreter of the graph before), what is kept, and the errors
that must come before any work."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ir import Graph, TensorType, input_node, sym, weight_node
from llmc.compiler.ops import Op, PermuteAttrs
from llmc.compiler.quant_layout import dequantize
from llmc.compiler.symbolic import SymDim
from llmc.compiler.verifier import verify
from llmc.errors import LLMCError
from llmc.passes.quant import QuantScheme
from llmc.passes.quant.calibrate import check_calibration_file
from llmc.passes.quantize import quantize_weights

F32, BF16 = DType.F32, DType.BF16


def mlp_graph(k: int = 64, hidden: int = 96, vocab: int = 40, dtype=F32, seed: int = 0) -> Graph:
    """x [b, s, k] -> up (a [K, N] weight) -> relu -> down (nn.Linear [N, K] read through a permute)
    -> + x -> head (its result is the output: the LM head)."""
    rng = np.random.default_rng(seed)
    b, s = sym("b"), sym("s")
    x = input_node("x", TensorType((b, s, k), dtype))
    params = {"up.weight": rng.standard_normal((k, hidden)).astype(dtype.numpy),
              "down.weight": rng.standard_normal((k, hidden)).astype(dtype.numpy),  # [N=k, K=hidden]
              "head.weight": rng.standard_normal((k, vocab)).astype(dtype.numpy)}
    w = {n: weight_node(n, TensorType(a.shape, dtype)) for n, a in params.items()}
    h = ir.node(Op.MATMUL, [x, w["up.weight"]], where="mlp.up_proj")
    h = ir.node(Op.RELU, [h])
    wt = ir.node(Op.PERMUTE, [w["down.weight"]], PermuteAttrs((1, 0)))
    h = ir.node(Op.ADD, [ir.node(Op.MATMUL, [h, wt], where="mlp.down_proj"), x])
    out = ir.node(Op.MATMUL, [h, w["head.weight"]], where="lm_head")
    return Graph((x,), (out,), params, {"b": SymDim("b", 1, 2), "s": SymDim("s", 1, 32)})


def _ops(g: Graph) -> Counter:
    return Counter(n.op for n in g.nodes())


def _x(g: Graph, rows: int = 5, seed: int = 1) -> np.ndarray:
    k = g.inputs[0].shape[-1]
    return np.random.default_rng(seed).standard_normal((2, rows, k)).astype(g.inputs[0].dtype.numpy)


@pytest.mark.parametrize("kind,group,sym_,tol", [("int8", 128, False, 0.02), ("int4", 32, False, 0.15),
                                                 ("int4", 32, True, 0.2)])
def test_before_after(kind, group, sym_, tol):
    g = mlp_graph()
    out, report = quantize_weights(g, QuantScheme(kind, group, sym_))
    verify(out)
    ops = _ops(out)
    assert ops[Op.QMATMUL] == 2 and ops[Op.MATMUL] == 1  # the head stays
    assert "up.weight" not in out.params and "down.weight" not in out.params and "head.weight" in out.params
    assert report.counts["quantized"] == 2 and report.counts["kept"] == 1 and "lm_head" in str(report)
    bits = 8 if kind == "int8" else 4
    up_q = out.params["up.weight.qweight"]
    assert up_q.dtype == (np.int8 if bits == 8 else np.uint8) and up_q.shape == (96, 64 if bits == 8 else 32)
    assert ("up.weight.zeros" in out.params) == (kind == "int4" and not sym_)
    # the quantized graph equals the original with each weight replaced by its dequantized value
    deq = dict(g.params)
    for name in ("up.weight", "down.weight"):
        qn = [n for n in out.nodes() if n.op is Op.QMATMUL and n.inputs[1].attrs.name == f"{name}.qweight"][0]
        w_nk = dequantize(out.params[f"{name}.qweight"], out.params[f"{name}.scales"],
                          out.params.get(f"{name}.zeros"), bits, qn.attrs.group, np.float32)
        deq[name] = w_nk.T if name == "up.weight" else w_nk
    x = _x(g)
    want = interpret(Graph(g.inputs, g.outputs, deq, g.symbols), [x])[0]
    got = interpret(out, [x])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # and stays near the float graph: relative error of the outputs
    ref = interpret(g, [x])[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol


def test_lm_head_quantized_on_request_and_tied_embedding_kept():
    g = mlp_graph()
    out, _ = quantize_weights(g, QuantScheme("int8", quantize_lm_head=True))
    assert _ops(out)[Op.QMATMUL] == 3 and _ops(out)[Op.MATMUL] == 0
    # a weight also read by an embedding gather stays float
    x = input_node("ids", TensorType((sym("s"),), DType.I64))
    emb = weight_node("emb", TensorType((40, 64), F32))
    h = ir.node(Op.RESHAPE, [ir.node(Op.TAKE, [emb, x], _axis0())], _shape((1, sym("s"), 64)))
    y = ir.node(Op.EXP, [ir.node(Op.MATMUL, [h, ir.node(Op.PERMUTE, [emb], PermuteAttrs((1, 0)))], where="tied")])
    g2 = Graph((x,), (y,), {"emb": np.ones((40, 64), np.float32)}, {"s": SymDim("s", 1, 8)})
    out2, rep = quantize_weights(g2, QuantScheme("int8"))
    assert _ops(out2)[Op.QMATMUL] == 0 and "embedding" in str(rep)


def _axis0():
    from llmc.compiler.ops import AxisAttrs
    return AxisAttrs(0)


def _shape(s):
    from llmc.compiler.ops import ShapeAttrs
    return ShapeAttrs(tuple(s))


def test_bf16_scales_take_the_weight_dtype():
    g = mlp_graph(dtype=BF16)
    out, _ = quantize_weights(g, QuantScheme("int4", 32))
    verify(out)
    assert out.params["up.weight.scales"].dtype == BF16.numpy and out.params["up.weight.zeros"].dtype == BF16.numpy


def test_group_that_does_not_divide_k_names_the_node():
    g = mlp_graph(hidden=96)  # down_proj has K = 96: 64 does not divide it
    with pytest.raises(LLMCError, match=r"group size 64 does not divide .*mlp\.down_proj \(K=96\).*--group 32"):
        quantize_weights(g, QuantScheme("int4", 64))


@pytest.mark.parametrize("kw,msg", [({"kind": "int3"}, "unknown quantization scheme"),
                                    ({"kind": "int4", "method": "smooth"}, "unknown quantization method"),
                                    ({"kind": "int4", "group": 48}, "group size must be one of"),
                                    ({"kind": "fp8", "method": "awq"}, "does not go with"),
                                    ({"kind": "int8", "method": "smoothquant"}, "does not go with"),
                                    ({"kind": "w8a8", "method": "gptq"}, "does not go with")])
def test_bad_scheme(kw, msg):
    with pytest.raises(LLMCError, match=msg):
        QuantScheme(**kw)


def test_calibration_file_checks(tmp_path):
    with pytest.raises(LLMCError, match="needs calibration text"):
        check_calibration_file(None, "gptq")
    with pytest.raises(LLMCError, match="does not exist"):
        check_calibration_file(tmp_path / "nope.txt", "awq")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LLMCError, match="is empty"):
        check_calibration_file(tmp_path / "empty.txt", "gptq")
    assert check_calibration_file(None, "rtn") is None


def test_gptq_without_windows_refused_before_work():
    with pytest.raises(LLMCError, match="needs calibration"):
        quantize_weights(mlp_graph(), QuantScheme("int4", 32, method="gptq"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_through_the_graph(method, monkeypatch):
    """gptq/awq calibrate by running the graph on windows (here: a graph taking floats, so the
    windows are fed as they are) and beat RTN on the calibration inputs."""
    from llmc.passes.quant import calibrate

    g = mlp_graph(seed=3)
    rng = np.random.default_rng(4)
    scales = np.exp(rng.standard_normal(64) * 1.5)  # a few channels with large activations, as in LLMs
    windows = [(rng.standard_normal((8, 64)) * scales).astype(np.float32) for _ in range(6)]
    monkeypatch.setattr(calibrate, "graph_inputs_for", lambda graph, w: [w[None]])
    x = np.stack(windows[:2])
    ref = interpret(g, [x])[0]
    errs = {}
    for m in ("rtn", method):
        out, _ = quantize_weights(g, QuantScheme("int4", 32, method=m), windows)
        verify(out)
        errs[m] = np.linalg.norm(interpret(out, [x])[0] - ref)
    assert errs[method] < errs["rtn"], errs


def test_w8a8_before_after_and_smoothquant_beats_plain_w8a8(monkeypatch):
    """w8a8: every weight matmul but the head becomes a QMATMUL with int8 activations (act_bits 8,
    per-channel int8 weights); on activations with outlier channels (as in LLMs) SmoothQuant's
    smoothing lowers the output error of plain W8A8, and both stay near the float graph."""
    from llmc.passes.quant import calibrate

    g = mlp_graph(seed=5)
    rng = np.random.default_rng()
    scales = np.ones(64)
    scales[rng.choice(64, 3, replace=False)] = 40.0  # three outlier channels
    windows = [(rng.standard_normal((8, 64)) * scales).astype(np.float32) for _ in range(6)]
    monkeypatch.setattr(calibrate, "graph_inputs_for", lambda graph, w: [w[None]])
    x = np.stack(windows[:2])
    ref = interpret(g, [x])[0]
    errs = {}
    for m in ("rtn", "smoothquant"):
        out, report = quantize_weights(g, QuantScheme("w8a8", method=m), windows)
        verify(out)
        q = [n for n in out.nodes() if n.op is Op.QMATMUL]
        assert len(q) == 2 and all(n.attrs.act_bits == 8 and n.attrs.bits == 8 for n in q)
        assert _ops(out)[Op.MATMUL] == 1  # the head stays
        errs[m] = np.linalg.norm(interpret(out, [x])[0] - ref) / np.linalg.norm(ref)
    assert errs["smoothquant"] < errs["rtn"] < 0.1, errs


def test_activation_quant_where_no_kernels_take_it_is_refused_before_capture():
    """W8A8 / FP8 run on the CPU and CUDA (sm_89+ for FP8); elsewhere the refusal names the cause
    before the model is even looked at (None here would fail capture)."""
    import llmc

    with pytest.raises(LLMCError, match="runs on the CPU and CUDA backends"):
        llmc.compile(None, (), target="rocm:gfx942", quant="w8a8")
    with pytest.raises(LLMCError, match="sm_89 or newer"):
        llmc.compile(None, (), target="cuda:sm_80", quant="fp8")
    with pytest.raises(LLMCError, match="expects a torch.nn.Module"):  # allowed: the next check is the model's
        llmc.compile(None, (), target="cuda:sm_90", quant="fp8")


def test_fp8_before_after():
    """fp8: e4m3 weight codes (uint8) with a scale per output channel, activations rounded to e4m3
    per row; the graph stays near the float one (e4m3 keeps 3 mantissa bits: ~3% per element)."""
    from llmc.compiler.quant_layout import float8_values

    g = mlp_graph(seed=7)
    out, report = quantize_weights(g, QuantScheme("fp8"))
    verify(out)
    q = [n for n in out.nodes() if n.op is Op.QMATMUL]
    assert len(q) == 2 and all(n.attrs.float8 and n.attrs.act_bits == 8 for n in q)
    up = next(n for n in q if "up" in n.where)
    codes, scales = (out.params[i.attrs.name] for i in up.inputs[1:3])
    assert codes.dtype == np.uint8 and scales.shape == (96, 1)
    w = g.params["up.weight"].T.astype(np.float64)  # [N, K]
    np.testing.assert_allclose(float8_values(codes) * scales, w, rtol=0.07, atol=1e-6)
    x = _x(g)
    ref = interpret(g, [x])[0]
    err = np.linalg.norm(interpret(out, [x])[0] - ref) / np.linalg.norm(ref)
    assert err < 0.08, err
    assert "fp8" in " ".join(report.lines)


def _tied_lm(vocab: int = 40, k: int = 64, seed: int = 0) -> Graph:
    """ids -> embedding (TAKE of emb) -> rms-free toy block -> logits = h @ emb^T (tied LM head)."""
    rng = np.random.default_rng(seed)
    s = sym("s")
    ids = input_node("ids", TensorType((1, s), DType.I64))
    emb = weight_node("emb", TensorType((vocab, k), F32))
    up = weight_node("up", TensorType((k, k), F32))
    h = ir.node(Op.TAKE, [emb, ids], _axis0(), where="embed_tokens")
    h = ir.node(Op.ADD, [h, ir.node(Op.TANH, [ir.node(Op.MATMUL, [h, up], where="mlp")])])
    logits = ir.node(Op.MATMUL, [h, ir.node(Op.PERMUTE, [emb], PermuteAttrs((1, 0)))], where="lm_head")
    params = {"emb": rng.standard_normal((vocab, k)).astype(np.float32),
              "up": (rng.standard_normal((k, k)) / 8).astype(np.float32)}
    return Graph((ids,), (logits,), params, {"s": SymDim("s", 1, 16)})


@pytest.mark.parametrize("kind,group,sym_", [("int4", 32, False), ("int4", 64, True), ("int8", 128, False)])
def test_tied_lm_head_quantized_with_its_embedding(kind, group, sym_):
    """quantize_lm_head on a tied model: the head's QMATMUL and the embedding's QTAKE read one packed
    table (no float copy left), and the graph equals the original with the table dequantized."""
    g = _tied_lm()
    out, report = quantize_weights(g, QuantScheme(kind, group, sym_, quantize_lm_head=True))
    verify(out)
    ops = _ops(out)
    assert ops[Op.QMATMUL] == 2 and ops[Op.QTAKE] == 1 and Op.TAKE not in ops and Op.MATMUL not in ops
    assert "emb" not in out.params and report.counts["kept"] == 0
    qtake = next(n for n in out.nodes() if n.op is Op.QTAKE)
    head = next(n for n in out.nodes() if n.op is Op.QMATMUL and n.where == "lm_head")
    assert [i.attrs.name for i in qtake.inputs if i.op is Op.WEIGHT] == \
        [i.attrs.name for i in head.inputs[1:]]  # the same packed weights, stored once
    bits = 4 if kind == "int4" else 8
    deq = dict(g.params)
    deq["emb"] = dequantize(out.params["emb.qweight"], out.params["emb.scales"], out.params.get("emb.zeros"), bits,
                            head.attrs.group, np.float32)
    deq["up"] = dequantize(out.params["up.qweight"], out.params["up.scales"], out.params.get("up.zeros"), bits,
                           next(n for n in out.nodes() if n.where == "mlp").attrs.group, np.float32).T
    ids = np.random.default_rng(5).integers(0, 40, (1, 11))
    want = interpret(Graph(g.inputs, g.outputs, deq, g.symbols), [ids])[0]
    np.testing.assert_allclose(interpret(out, [ids])[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [{"kind": "int4", "group": 32, "method": "awq"}, {"kind": "w8a8"},
                                {"kind": "int4", "group": 32}])
def test_tied_table_kept_where_the_codes_cannot_serve_the_embedding(kw):
    """awq / w8a8 change what the head's codes stand for, and without quantize_lm_head the head is kept."""
    g = _tied_lm()
    head = kw.get("method") == "awq" or kw["kind"] == "w8a8"
    scheme = QuantScheme(**kw, quantize_lm_head=head)
    out, report = (quantize_weights(g, scheme, calibration=[np.arange(8)]) if kw.get("method") == "awq"
                   else quantize_weights(g, scheme))
    assert Op.QTAKE not in _ops(out) and "emb" in out.params and report.counts["kept"] == 1
