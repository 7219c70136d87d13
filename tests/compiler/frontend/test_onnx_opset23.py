"""Opset-23 transformer ops (Attention, RotaryEmbedding, RMSNormalization) against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.compiler.interpreter import interpret  # noqa: E402
from llmc.compiler.ops import Op  # noqa: E402
from llmc.compiler.verifier import verify  # noqa: E402

F, B, I = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64


def _model(node, inputs, n_out=1):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(o, F, None) for o in node.output[:n_out]])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    return m


def _run_both(m, feeds):
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # pragma: no cover - depends on the onnxruntime build
        pytest.skip(f"onnxruntime cannot load opset 23 here: {e}")
    expected = sess.run(None, feeds)
    graph = from_onnx(m)
    verify(graph)
    with np.errstate(all="ignore"):
        got = interpret(graph, [feeds[n.attrs.name] for n in graph.inputs])
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
    return graph


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("seq", [3, 6])
def test_attention_4d_gqa(mask, causal, seq):
    rng = np.random.default_rng(seq)
    ins = ["q", "k", "v"] + (["m"] if mask else [])
    node = helper.make_node("Attention", ins, ["y"], is_causal=causal)
    inputs = [("q", F, ["b", 4, "s", 8]), ("k", F, ["b", 2, "s", 8]), ("v", F, ["b", 2, "s", 8])]
    feeds = {"q": _rand(rng, 2, 4, seq, 8), "k": _rand(rng, 2, 2, seq, 8), "v": _rand(rng, 2, 2, seq, 8)}
    if mask == "bool":
        inputs.append(("m", B, ["b", 1, "s", "s"]))
        feeds["m"] = np.ones((2, 1, seq, seq), bool)
        feeds["m"][1, ..., :1] = False  # a padded key
        feeds["m"][1, 0, 1, :] = False  # a fully masked query row: zeros out
    elif mask == "float":
        inputs.append(("m", F, ["s", "s"]))
        feeds["m"] = _rand(rng, seq, seq)
    g = _run_both(_model(node, inputs), feeds)
    assert any(n.op is Op.ATTENTION for n in g.nodes())


def test_attention_3d_with_past_and_scale():
    rng = np.random.default_rng(0)
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pres_k", "pres_v"],
                            q_num_heads=4, kv_num_heads=2, scale=0.3, is_causal=1)
    inputs = [("q", F, ["b", "s", 32]), ("k", F, ["b", "s", 16]), ("v", F, ["b", "s", 16]),
              ("pk", F, ["b", 2, "p", 8]), ("pv", F, ["b", 2, "p", 8])]
    feeds = {"q": _rand(rng, 2, 3, 32), "k": _rand(rng, 2, 3, 16), "v": _rand(rng, 2, 3, 16),
             "pk": _rand(rng, 2, 2, 5, 8), "pv": _rand(rng, 2, 2, 5, 8)}
    _run_both(_model(node, inputs, n_out=3), feeds)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [0, 4])
def test_rotary_embedding_4d(interleaved, rotary_dim):
    rng = np.random.default_rng(1)
    half = (rotary_dim or 8) // 2
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], interleaved=interleaved,
                            rotary_embedding_dim=rotary_dim)
    inputs = [("x", F, ["b", 2, "s", 8]), ("cos", F, ["b", "s", half]), ("sin", F, ["b", "s", half])]
    feeds = {"x": _rand(rng, 2, 2, 5, 8), "cos": _rand(rng, 2, 5, half), "sin": _rand(rng, 2, 5, half)}
    _run_both(_model(node, inputs), feeds)


def test_rotary_embedding_3d_position_ids():
    rng = np.random.default_rng(2)
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], num_heads=2)
    inputs = [("x", F, ["b", "s", 16]), ("cos", F, [32, 4]), ("sin", F, [32, 4]), ("pos", I, ["b", "s"])]
    feeds = {"x": _rand(rng, 2, 5, 16), "cos": _rand(rng, 32, 4), "sin": _rand(rng, 32, 4),
             "pos": rng.integers(0, 32, (2, 5)).astype(np.int64)}
    _run_both(_model(node, inputs), feeds)


def test_rms_normalization():
    rng = np.random.default_rng(3)
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], epsilon=1e-5)
    inputs = [("x", F, ["b", 8]), ("w", F, [8])]
    g = _run_both(_model(node, inputs), {"x": _rand(rng, 3, 8), "w": _rand(rng, 8)})
    assert any(n.op is Op.RMS_NORM for n in g.nodes())
