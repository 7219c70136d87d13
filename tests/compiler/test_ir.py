"""IR invariants: table coverage, typing errors, printer, verifier, interpreter binding."""
import numpy as np
import pytest

from llmc.compiler import infer, reference
from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import ConstAttrs, Op, ShapeAttrs
from llmc.compiler.symbolic import SymDim
from llmc.compiler.verifier import VerifyError, verify
from llmc.errors import InputError, LLMCError

B, S = sym("b"), sym("s")
SYMS = {"b": SymDim("b", 1, 4), "s": SymDim("s", 1, 32)}


def small_graph():
    x = input_node("x", TensorType((B, S, 8), DType.F32))
    w = weight_node("w", TensorType((8, 4), DType.F32))
    y = node(Op.MATMUL, [x, w], where="layer.proj")
    z = node(Op.ADD, [node(Op.RESHAPE, [y], ShapeAttrs((B * S, 4))), node(Op.CONST, [], ConstAttrs(1.0, DType.F32))])
    w_data = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    return Graph((x,), (z,), {"w": w_data}, SYMS), w_data


def test_every_op_has_inference_and_reference():
    sources = {Op.INPUT, Op.WEIGHT}
    assert set(infer.INFER) == set(Op)
    assert set(reference.REFERENCE) | sources == set(Op)


def test_type_errors_name_the_op_and_place():
    a = input_node("a", TensorType((3, 4), DType.F32))
    with pytest.raises(LLMCError, match="MATMUL at blk.0"):
        node(Op.MATMUL, [a, a], where="blk.0")
    with pytest.raises(LLMCError, match="broadcast"):
        node(Op.ADD, [a, input_node("c", TensorType((5,), DType.F32))])


def test_printer_is_readable():
    g, _ = small_graph()
    text = str(g)
    assert "graph(%x: f32[b, s, 8])" in text
    assert "%0: f32[b, s, 4] = matmul(%x, @w)" in text
    assert "reshape{shape=(b*s, 4)}" in text and "# layer.proj" in text


def test_interpreter_matches_numpy_for_two_shapes():
    g, w = small_graph()
    verify(g)
    for shape in [(1, 3, 8), (2, 7, 8)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        (out,) = interpret(g, [x])
        np.testing.assert_allclose(out, (x @ w).reshape(-1, 4) + 1, rtol=1e-6, atol=1e-6)


def test_interpreter_rejects_bad_inputs():
    g, _ = small_graph()
    with pytest.raises(InputError, match="rank"):
        interpret(g, [np.zeros((2, 8), np.float32)])
    with pytest.raises(InputError, match="dtype"):
        interpret(g, [np.zeros((1, 2, 8), np.float64)])
    with pytest.raises(InputError, match="outside its bounds"):
        interpret(g, [np.zeros((1, 33, 8), np.float32)])
    with pytest.raises(InputError, match="expected"):
        interpret(g, [np.zeros((1, 2, 9), np.float32)])


def test_verifier_catches_bad_weights():
    g, w = small_graph()
    bad = Graph(g.inputs, g.outputs, {"w": w.astype(np.float64)}, g.symbols)
    with pytest.raises(VerifyError, match="weight 'w'"):
        verify(bad)
    with pytest.raises(VerifyError, match="no data"):
        verify(Graph(g.inputs, g.outputs, {}, g.symbols))
