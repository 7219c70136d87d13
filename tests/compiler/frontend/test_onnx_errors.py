"""Bad ONNX input raises LLMCError (UnsupportedOpError for operators) naming the node."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.compiler.interpreter import interpret  # noqa: E402
from llmc.errors import LLMCError, UnsupportedOpError  # noqa: E402

F, I = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs=(("x", F, ["n", 4]),), outputs=(("y", F, None),), inits=None, opsets=(("", 17),)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info(*o) for o in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 9
    return m


def test_not_an_onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_text("this is not a protobuf, just some text\n" * 10)
    with pytest.raises(LLMCError, match="model"):
        from_onnx(str(p))
    with pytest.raises(LLMCError, match="does not exist"):
        from_onnx(str(tmp_path / "missing.onnx"))
    with pytest.raises(LLMCError):
        from_onnx(12345)


def test_truncated_file(tmp_path):
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
               inits={"w": np.ones((4, 4), np.float32)})
    data = m.SerializeToString()
    for cut in (1, 7, len(data) // 2, len(data) - 3):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(LLMCError):
            from_onnx(str(p))


def test_unknown_op_names_node():
    m = _model([helper.make_node("FrobnicateTensor", ["x"], ["y"], name="my_node")])
    with pytest.raises(UnsupportedOpError, match=r"'my_node' \(FrobnicateTensor\)"):
        from_onnx(m)


def test_contrib_domain_op():
    m = _model([helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="fused", domain="com.microsoft")],
               opsets=(("", 17), ("com.microsoft", 1)))
    with pytest.raises(UnsupportedOpError, match=r"'fused' \(FusedMatMul\).*com\.microsoft"):
        from_onnx(m)


@pytest.mark.parametrize("opset", [7, 9, 12])
def test_old_opset_upgraded(opset):
    """Opsets < 13 go through onnx.version_converter (Unsqueeze's axes move to an input at 13)."""
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Unsqueeze", ["r"], ["y"], axes=[0])],
               opsets=(("", opset),))
    g = from_onnx(m)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(interpret(g, [x])[0], np.maximum(x, 0)[None])


def test_old_opset_conversion_failure_names_op():
    m = _model([helper.make_node("Scatter", ["x"], ["y"], name="sc")], opsets=(("", 9),))
    with pytest.raises(LLMCError, match=r"cannot upgrade ONNX opset 9 to 13.*Scatter"):
        from_onnx(m)
    m = _model([helper.make_node("NoSuchOp", ["x"], ["y"])], opsets=(("", 9),))
    with pytest.raises(UnsupportedOpError, match=r"unknown ONNX operator\(s\) NoSuchOp"):
        from_onnx(m)


def test_new_opset_rejected():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], opsets=(("", 99),))
    with pytest.raises(LLMCError, match="opset 99"):
        from_onnx(m)


def test_runtime_reshape_target_names_node():
    m = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="dyn_reshape")],
               inputs=(("x", F, ["n", 4]), ("shape", I, [2])))
    with pytest.raises(LLMCError, match=r"'dyn_reshape' \(Reshape\).*runtime data"):
        from_onnx(m)


def test_symbolic_split_and_strided_slice():
    m = _model([helper.make_node("Split", ["x"], ["a", "b"], axis=0, name="halves")],
               outputs=(("a", F, None), ("b", F, None)))
    with pytest.raises(LLMCError, match=r"'halves' \(Split\)"):
        from_onnx(m)
    inits = {"s": np.array([0]), "e": np.array([100]), "a": np.array([0]), "st": np.array([2])}
    m = _model([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"], name="every_other")], inits=inits)
    with pytest.raises(LLMCError, match=r"'every_other' \(Slice\)"):
        from_onnx(m)


def test_bad_attribute_type_and_shapes():
    m = _model([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=2.5)])
    with pytest.raises(LLMCError, match=r"'sm' \(Softmax\).*axis"):
        from_onnx(m)
    m = _model([helper.make_node("Transpose", ["x"], ["y"], name="tp", perm=[0, 0])])
    with pytest.raises(LLMCError, match=r"'tp' \(Transpose\)"):
        from_onnx(m)
    m = _model([helper.make_node("Add", ["x", "w"], ["y"], name="bad_add")], inits={"w": np.ones(3, np.float32)})
    with pytest.raises(LLMCError, match=r"'bad_add' \(Add\)"):
        from_onnx(m)


def test_undefined_input_and_output():
    m = _model([helper.make_node("Relu", ["nowhere"], ["y"], name="r")])
    with pytest.raises(LLMCError, match=r"'r' \(Relu\).*nowhere"):
        from_onnx(m)
    m = _model([helper.make_node("Relu", ["x"], ["z"], name="r")])
    with pytest.raises(LLMCError, match="'y'"):
        from_onnx(m)


def test_unsupported_dtype_and_missing_shape():
    m = _model([helper.make_node("Identity", ["x"], ["y"])], inputs=(("x", TensorProto.STRING, [2]),))
    with pytest.raises(LLMCError, match="STRING"):
        from_onnx(m)
    m = _model([helper.make_node("Identity", ["x"], ["y"])], inputs=(("x", F, None),))
    with pytest.raises(LLMCError, match="no shape"):
        from_onnx(m)


def test_missing_external_data(tmp_path):
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inits={"w": np.ones((4, 4), np.float32)})
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(LLMCError):
        from_onnx(str(p))


def test_dead_unsupported_node_is_ignored():
    m = _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("FrobnicateTensor", ["x"], ["unused"])])
    assert from_onnx(m).outputs[0].op.name == "RELU"
