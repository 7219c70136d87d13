"""float64 ONNX graphs compile and run in float64 (never narrowed to float32)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import llmc  # noqa: E402
from llmc.compiler.dtypes import DType  # noqa: E402
from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402

D = TensorProto.DOUBLE


@pytest.fixture(scope="module")
def f64_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Softmax", ["h"], ["p"], axis=-1),
             helper.make_node("Exp", ["h"], ["e"]),
             helper.make_node("ReduceSum", ["e", "ax"], ["s"], keepdims=1),
             helper.make_node("Add", ["p", "s"], ["y"]),
             helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
             # attention spelled out: stays unfused in f64 (the fused kernel computes in f32)
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["qk"]),
             helper.make_node("Mul", ["qk", "scale"], ["qks"]),
             helper.make_node("Softmax", ["qks"], ["pa"], axis=-1),
             helper.make_node("MatMul", ["pa", "h"], ["att"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", D, [2, "n", 6])],
                          [helper.make_tensor_value_info("y", D, None), helper.make_tensor_value_info("y32", 1, None),
                           helper.make_tensor_value_info("att", D, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64), "ax"),
                           numpy_helper.from_array(np.array(0.3), "scale")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return m, w


def _softmax(h):
    p = np.exp(h - h.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _numpy(x, w):
    h = x @ w
    return _softmax(h) + np.exp(h).sum(-1, keepdims=True), _softmax(h @ h.transpose(0, 2, 1) * 0.3) @ h


def test_import_keeps_float64(f64_model):
    m, _ = f64_model
    g = from_onnx(m)
    assert g.inputs[0].dtype is DType.F64 and g.params["w"].dtype == np.float64
    assert [o.dtype for o in g.outputs] == [DType.F64, DType.F32, DType.F64]


def test_compiled_in_float64(f64_model, tmp_path):
    m, w = f64_model
    path = str(tmp_path / "f64.onnx")
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    cm = llmc.compile(path)
    x = np.random.default_rng(1).standard_normal((2, 3, 6)) * 3
    y, y32, att = cm(x)
    want, want_att = _numpy(x, w)
    np.testing.assert_allclose(att, want_att, rtol=1e-12, atol=1e-12)
    assert y.dtype == np.float64 and y32.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)  # far below float32's precision
    np.testing.assert_allclose(y32, want.astype(np.float32), rtol=1e-6)
    loaded = llmc.load(cm.export(tmp_path / "art"))
    np.testing.assert_array_equal(loaded(x)[0], y)
