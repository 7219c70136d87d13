"""Per-operator checks of the ONNX frontend on small hand-built graphs, against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.compiler.interpreter import interpret  # noqa: E402
from llmc.compiler.ops import Op  # noqa: E402
from llmc.compiler.verifier import verify  # noqa: E402
from llmc.errors import LLMCError  # noqa: E402

F, I, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
_NP = {F: np.float32, I: np.int64, B: np.bool_}


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    """inputs/outputs: (name, elem type, shape with str for symbolic dims); inits: name -> array."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9 if opset <= 21 else 10
    return m


def feeds_for(inputs, env, rng):
    out = {}
    for name, t, shape in inputs:
        dims = [env[d] if isinstance(d, str) else d for d in shape]
        if t == F:
            out[name] = rng.standard_normal(dims).astype(np.float32)
        elif t == I:
            out[name] = rng.integers(0, 4, dims).astype(np.int64)
        else:
            out[name] = rng.random(dims) < 0.5
    return out


def check(model, inputs, envs=({"n": 3}, {"n": 5}), tol=1e-5, **kw):
    """Import, verify, and compare with onnxruntime at each symbol assignment."""
    graph = from_onnx(model, **kw)
    verify(graph)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for env in envs:
        feeds = feeds_for(inputs, env, rng)
        expected = sess.run(None, feeds)
        with np.errstate(all="ignore"):
            got = interpret(graph, [feeds[n.attrs.name] for n in graph.inputs])
        for g, e in zip(got, expected):
            assert g.shape == e.shape, (g.shape, e.shape)
            if e.dtype.kind == "f":
                np.testing.assert_allclose(g, e, atol=tol, rtol=tol)
            else:
                np.testing.assert_array_equal(g, e)
    return graph


def single(op, n_in=1, attrs=None, shapes=None, types=None, out_type=F, opset=17, inits=(), extra_inputs=(), **kw):
    """A one-node model over inputs x0..; extra_inputs are initializer-backed input names."""
    shapes = shapes or [["n", 4]] * n_in
    types = types or [F] * n_in
    inputs = [(f"x{i}", t, s) for i, (t, s) in enumerate(zip(types, shapes))]
    names = [n for n, _, _ in inputs] + list(extra_inputs)
    node = helper.make_node(op, names, ["y"], name=f"the_{op}", **(attrs or {}))
    return make_model([node], inputs, [("y", out_type, None)], inits, opset), inputs


# ---- elementwise ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Neg", "Exp", "Abs", "Erf", "Tanh", "Sigmoid", "Relu", "Sin", "Cos"])
def test_unary(op):
    check(*single(op))


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_unary_positive(op):
    m, inputs = single(op)
    graph = from_onnx(m)
    x = np.abs(np.random.default_rng(1).standard_normal((3, 4))).astype(np.float32) + 0.1
    (got,) = interpret(graph, [x])
    (exp,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x0": x})
    np.testing.assert_allclose(got, exp, rtol=1e-6)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"])
def test_binary_broadcast(op):
    check(*single(op, 2, shapes=[["n", 4], [4]]))


@pytest.mark.parametrize("op", ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
def test_compare(op):
    check(*single(op, 2, shapes=[["n", 4], ["n", 1]], types=[I, I], out_type=B))


@pytest.mark.parametrize("op", ["And", "Or", "Xor"])
def test_logic(op):
    check(*single(op, 2, types=[B, B], out_type=B))


def test_not_where_isnan_isinf():
    nodes = [helper.make_node("Not", ["c"], ["nc"]),
             helper.make_node("Where", ["nc", "x", "z"], ["w"]),
             helper.make_node("Div", ["w", "w"], ["d"]),  # 0/0 = nan
             helper.make_node("IsNaN", ["d"], ["nan"]),
             helper.make_node("IsInf", ["d"], ["inf"])]
    inputs = [("c", B, ["n", 4]), ("x", F, ["n", 4])]
    m = make_model(nodes, inputs, [("nan", B, None), ("inf", B, None)], {"z": np.float32(0)})
    check(m, inputs)


def test_pow_clip_gelu():
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("Clip", ["p", "lo", "hi"], ["c"]),
             helper.make_node("Gelu", ["c"], ["g1"]),
             helper.make_node("Gelu", ["x"], ["g2"], approximate="tanh")]
    inputs = [("x", F, ["n", 4])]
    m = make_model(nodes, inputs, [("g1", F, None), ("g2", F, None)],
                   {"two": np.float32(2), "lo": np.float32(0.1), "hi": np.float32(2.0)}, opset=20)
    check(m, inputs)


def test_cast_and_castlike():
    nodes = [helper.make_node("Cast", ["x"], ["i"], to=I), helper.make_node("CastLike", ["i", "x"], ["y"])]
    inputs = [("x", F, ["n", 4])]
    check(make_model(nodes, inputs, [("y", F, None)]), inputs)


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_logsoftmax(axis):
    check(*single("Softmax", attrs={"axis": axis}))
    check(*single("LogSoftmax", attrs={"axis": axis}))


# ---- linear algebra and normalization -------------------------------------------------------
@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm(ta, tb):
    rng = np.random.default_rng(0)
    a_shape = [4, "n"] if ta else ["n", 4]
    w = rng.standard_normal((5, 4) if tb else (4, 5)).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], transA=ta, transB=tb, alpha=0.5, beta=2.0)
    inputs = [("a", F, a_shape)]
    check(make_model([node], inputs, [("y", F, None)], {"w": w, "c": rng.standard_normal(5).astype(np.float32)}),
          inputs)


@pytest.mark.parametrize("sa,sb", [([4], [4, 3]), (["n", 4], [4]), ([2, "n", 4], [4, 3]), ([4], [2, 4, 3])])
def test_matmul_ranks(sa, sb):
    check(*single("MatMul", 2, shapes=[sa, sb]))


@pytest.mark.parametrize("axis,bias", [(-1, True), (-1, False), (1, True)])
def test_layer_norm(axis, bias):
    rng = np.random.default_rng(0)
    wshape = (4,) if axis == -1 else (3, 4)
    inits = {"w": rng.standard_normal(wshape).astype(np.float32), "b": rng.standard_normal(wshape).astype(np.float32)}
    node = helper.make_node("LayerNormalization", ["x", "w", "b"] if bias else ["x", "w"], ["y"], axis=axis,
                            epsilon=1e-3)
    inputs = [("x", F, ["n", 3, 4])]
    g = check(make_model([node], inputs, [("y", F, None)], inits), inputs, tol=1e-4)
    assert any(n.op is Op.LAYER_NORM for n in g.nodes()) == (axis == -1)


def test_rms_normalization_opset23():
    w = np.linspace(0.5, 1.5, 4).astype(np.float32)
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], epsilon=1e-5)
    inputs = [("x", F, ["n", 4])]
    m = make_model([node], inputs, [("y", F, None)], {"w": w}, opset=23)
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        pytest.skip("onnxruntime cannot run opset 23 RMSNormalization")
    g = check(m, inputs)
    assert any(n.op is Op.RMS_NORM for n in g.nodes())


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare"])
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op, opset, keepdims):
    axes = [-1, 0]
    as_input = opset >= 18 or op == "ReduceSum"
    attrs = {"keepdims": keepdims} if as_input else {"keepdims": keepdims, "axes": axes}
    m, inputs = single(op, 1, attrs=attrs, shapes=[["n", 3, 4]], opset=opset,
                       inits={"axes": np.array(axes, np.int64)} if as_input else (),
                       extra_inputs=["axes"] if as_input else ())
    check(m, inputs, tol=1e-4)


def test_reduce_all_and_noop():
    check(*single("ReduceSum", attrs={"keepdims": 0}, shapes=[["n", 4]]))
    m, inputs = single("ReduceSum", attrs={"noop_with_empty_axes": 1}, shapes=[["n", 4]])
    check(m, inputs)


@pytest.mark.parametrize("exclusive,reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cumsum(exclusive, reverse):
    m, inputs = single("CumSum", attrs={"exclusive": exclusive, "reverse": reverse}, shapes=[[3, 5]],
                       inits={"ax": np.array(1, np.int64)}, extra_inputs=["ax"])
    check(m, inputs, tol=1e-5)


@pytest.mark.parametrize("upper,k", [(1, 0), (0, 0), (1, 1), (0, -1)])
def test_trilu(upper, k):
    m, inputs = single("Trilu", attrs={"upper": upper}, shapes=[[2, "n", "n"]],
                       inits={"k": np.array(k, np.int64)}, extra_inputs=["k"])
    check(m, inputs)


# ---- data movement --------------------------------------------------------------------------
def test_gather_variants():
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
             helper.make_node("Gather", ["emb", "neg"], ["last"], axis=1),  # negative constant index
             helper.make_node("GatherElements", ["emb", "ge"], ["ge_out"], axis=2),
             helper.make_node("GatherND", ["table", "nd"], ["nd_out"])]
    rng = np.random.default_rng(0)
    inits = {"table": rng.standard_normal((6, 3)).astype(np.float32), "neg": np.array(-1, np.int64),
             "ge": np.array([[[2, 0, 1]]], np.int64), "nd": np.array([[5, 2], [0, 0]], np.int64)}
    inputs = [("ids", I, ["n", 2])]
    m = make_model(nodes, inputs, [("last", F, None), ("nd_out", F, None), ("ge_out", F, None)], inits)
    check(m, inputs)


def test_gather_elements_runtime_index():
    nodes = [helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)]
    inputs = [("x", F, ["n", 4]), ("i", I, ["n", 2])]
    check(make_model(nodes, inputs, [("y", F, None)]), inputs)


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [3], [1], [1]), ([0, -3], [2, 100], [1, 2], [1, 1]), ([3], [0], [2], [-1]),
    ([-1], [-2**63], [1], [-2]), ([0], [2**63 - 1], [2], [2]), ([1], [-1], [0], [1])])
def test_slice(starts, ends, axes, steps):
    inits = {"s": np.array(starts, np.int64), "e": np.array(ends, np.int64), "a": np.array(axes, np.int64),
             "st": np.array(steps, np.int64)}
    node = helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])
    inputs = [("x", F, ["n", 4, 5])]
    check(make_model([node], inputs, [("y", F, None)], inits), inputs, envs=({"n": 3}, {"n": 6}))


def test_split_variants():
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Split", ["x"], ["c", "d", "e"], axis=1, num_outputs=3)]
    inputs = [("x", F, ["n", 6])]
    outs = [(o, F, None) for o in "abcde"]
    check(make_model(nodes, inputs, outs, {"sizes": np.array([2, 4], np.int64)}, opset=18), inputs)


def test_concat_transpose_flatten_tile_expand():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Concat", ["t", "t"], ["c"], axis=-1),
             helper.make_node("Flatten", ["c"], ["f"], axis=2),
             helper.make_node("Tile", ["x", "reps"], ["tile"]),
             helper.make_node("Expand", ["col", "eshape"], ["ex"]),  # bidirectional: [n,1] x [3,1,4]
             helper.make_node("Transpose", ["x"], ["rev"]),
             helper.make_node("Flatten", ["x"], ["f_neg"], axis=-1),
             helper.make_node("Flatten", ["x"], ["f_0"], axis=0)]
    inputs = [("x", F, ["n", 2, 3]), ("col", F, ["n", 1])]
    inits = {"reps": np.array([1, 2, 3], np.int64), "eshape": np.array([3, 1, 4], np.int64)}
    outs = [(o, F, None) for o in ("f", "tile", "ex", "rev", "f_neg", "f_0")]
    check(make_model(nodes, inputs, outs, inits), inputs)


def test_squeeze_unsqueeze_dropout_identity_size():
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax"], ["s"]),
             helper.make_node("Squeeze", ["u"], ["s_all"]),
             helper.make_node("Dropout", ["s"], ["d", "mask"]),
             helper.make_node("Identity", ["d"], ["y"]),
             helper.make_node("Size", ["x"], ["size"])]
    inputs = [("x", F, ["n", 4])]
    outs = [("y", F, None), ("s_all", F, None), ("mask", B, None), ("size", I, None)]
    check(make_model(nodes, inputs, outs, {"ax": np.array([-1, 1], np.int64)}), inputs)


# ---- shape arithmetic is folded at import time --------------------------------------------------
def _shape_program():
    """y = reshape(x, [shape(x)[0] * shape(x)[1], -1]) + range(shape(x)[1]) expanded by ConstantOfShape."""
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             c("i0", 0), c("i1", 1), c("one", 1), c("zero", 0), c("m1", [-1]), c("ax0", [0]),
             helper.make_node("Gather", ["sh", "i0"], ["d0"]),
             helper.make_node("Gather", ["sh", "i1"], ["d1"]),
             helper.make_node("Mul", ["d0", "d1"], ["rows"]),
             helper.make_node("Unsqueeze", ["rows", "ax0"], ["rows1"]),
             helper.make_node("Concat", ["rows1", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("Cast", ["d1"], ["d1f"], to=F),
             helper.make_node("Range", ["zero", "d1", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=F),
             helper.make_node("Div", ["rf", "d1f"], ["frac"]),  # runtime: divides by a symbolic float
             helper.make_node("Shape", ["flat"], ["fsh"]),
             helper.make_node("Equal", ["fsh", "m1"], ["is_m1"]),  # n*k == -1 is decidable: false
             helper.make_node("Where", ["is_m1", "one", "fsh"], ["fsh2"]),
             helper.make_node("ConstantOfShape", ["fsh2"], ["zeros"],
                              value=numpy_helper.from_array(np.array([2.0], np.float32))),
             helper.make_node("Add", ["flat", "zeros"], ["y0"]),
             c("zero_v", [0]),
             helper.make_node("Slice", ["y0", "zero_v", "rows1", "ax0"], ["y"])]  # [0:b*s]: a no-op
    inputs = [("x", F, ["b", "s", 4])]
    return make_model(nodes, inputs, [("y", F, None), ("frac", F, None)]), inputs


def test_shape_arithmetic_folds_to_symbolic_attrs():
    m, inputs = _shape_program()
    g = check(m, inputs, envs=({"b": 2, "s": 3}, {"b": 1, "s": 5}), dim_bounds={"b": (1, 8), "s": (1, 16)})
    assert g.symbols["b"].hi == 8 and g.symbols["s"].hi == 16
    ops = {n.op for n in g.nodes()}
    assert Op.RESHAPE in ops and Op.CONCAT not in ops and Op.EQ not in ops and Op.WHERE not in ops
    (reshape,) = [n for n in g.nodes() if n.op is Op.RESHAPE and n.inputs[0] is g.inputs[0]]
    assert str(reshape.shape[0]) == "b*s" and reshape.shape[1] == 4
    full = [n for n in g.nodes() if n.op is Op.FULL]
    assert full and str(full[0].attrs.shape[0]) == "b*s"


def test_dim_param_sanitized_and_default_bounds():
    node = helper.make_node("Relu", ["x"], ["y"])
    inputs = [("x", F, ["batch size", "2seq", None])]
    g = from_onnx(make_model([node], inputs, [("y", F, None)]), default_bound=(2, 99),
                  dim_bounds={"batch size": (1, 4)})
    verify(g)
    assert set(g.symbols) == {"batch_size", "d_2seq", "x_dim2"}
    assert (g.symbols["batch_size"].lo, g.symbols["batch_size"].hi) == (1, 4)
    assert (g.symbols["d_2seq"].lo, g.symbols["d_2seq"].hi) == (2, 99)
    with pytest.raises(LLMCError, match="unknown dims"):
        from_onnx(make_model([node], inputs, [("y", F, None)]), dim_bounds={"batch_size_typo": (1, 4)})
    with pytest.raises(LLMCError, match="bounds"):
        from_onnx(make_model([node], inputs, [("y", F, None)]), dim_bounds={"batch size": (5, 4)})


def test_initializers_are_named_weights_and_scalars_consts():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])]
    inputs = [("x", F, ["n", 3])]
    g = check(make_model(nodes, inputs, [("y", F, None)], {"w": w, "s": np.float32(0.5)}), inputs)
    assert list(g.params) == ["w"] and g.params["w"] is not None
    assert any(n.op is Op.CONST and n.attrs.value == 0.5 for n in g.nodes())


def test_external_data(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    inputs = [("x", F, ["n", 64])]
    m = make_model([node], inputs, [("y", F, None)], {"w": w})
    path = tmp_path / "sub" / "model.onnx"
    path.parent.mkdir()
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert (path.parent / "weights.bin").exists()
    g = from_onnx(str(path))
    np.testing.assert_array_equal(g.params["w"], w)
    # a ModelProto with external references needs base_dir
    proto = onnx.load(str(path), load_external_data=False)
    g2 = from_onnx(proto, base_dir=str(path.parent))
    np.testing.assert_array_equal(g2.params["w"], w)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(interpret(g, [x])[0], x @ w, rtol=1e-5, atol=1e-5)
