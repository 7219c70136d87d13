"""Bounds of symbolic ONNX dims whatever their names: by name, by position (batch/seq), or an error."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper  # noqa: E402

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.compiler.interpreter import interpret  # noqa: E402
from llmc.errors import LLMCError  # noqa: E402

CLI_BOUNDS = {"batch": (1, 4), "seq": (1, 32)}  # what `llmc compile` always passes


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, ids):
        return torch.relu(self.lin(self.emb(ids))).sum(-1)


@pytest.fixture(scope="module")
def exported_bs(tmp_path_factory):
    """A torch-exported file whose dynamic dims are named 'b' and 's'."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("dims") / "tiny_bs.onnx")
    ids = torch.zeros(2, 5, dtype=torch.int64)
    torch.onnx.export(_Tiny().eval(), (ids,), path, dynamo=False, opset_version=17, input_names=["ids"],
                      output_names=["y"], dynamic_axes={"ids": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}})
    dims = [d.dim_param for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["b", "s"]
    return path


def test_positional_bounds_for_dims_named_b_s(exported_bs):
    g = from_onnx(exported_bs, dim_bounds=CLI_BOUNDS)
    assert {k: (v.lo, v.hi) for k, v in g.symbols.items()} == {"b": (1, 4), "s": (1, 32)}
    sess = ort.InferenceSession(exported_bs, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in ((1, 7), (3, 32)):
        ids = rng.integers(0, 50, shape).astype(np.int64)
        (got,) = interpret(g, [ids])
        (want,) = sess.run(None, {"ids": ids})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_named_bounds_beat_positional(exported_bs):
    g = from_onnx(exported_bs, dim_bounds={**CLI_BOUNDS, "s": (2, 9)})
    assert (g.symbols["b"].lo, g.symbols["b"].hi) == (1, 4)
    assert (g.symbols["s"].lo, g.symbols["s"].hi) == (2, 9)


def test_unknown_names_are_errors_but_batch_seq_are_not(exported_bs):
    from_onnx(exported_bs, dim_bounds={"b": (1, 2), "s": (1, 3), "batch": (1, 8), "seq": (1, 8)})
    with pytest.raises(LLMCError, match=r"unknown dims \['sequence'\]"):
        from_onnx(exported_bs, dim_bounds={**CLI_BOUNDS, "sequence": (1, 8)})


def test_llmc_compile_onnx_with_cli_bounds(exported_bs):
    import llmc

    cm = llmc.compile(exported_bs, dim_bounds=CLI_BOUNDS)
    ids = np.random.default_rng(1).integers(0, 50, (2, 9)).astype(np.int64)
    (want,) = ort.InferenceSession(exported_bs, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    np.testing.assert_allclose(cm(ids)[0], want, rtol=1e-5, atol=1e-5)


def _relu_model(dims):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unnamed_dims_take_positional_bounds():
    m = _relu_model([None, None, 4])  # neither dim_value nor dim_param
    assert not m.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_param")
    g = from_onnx(m, dim_bounds=CLI_BOUNDS)
    assert {k: (v.lo, v.hi) for k, v in g.symbols.items()} == {"x_dim0": (1, 4), "x_dim1": (1, 32)}
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(interpret(g, [x])[0], np.maximum(x, 0))


def test_other_unbounded_dims_are_named_in_the_error():
    m = _relu_model(["n", None, "h", None])
    with pytest.raises(LLMCError, match=r"'h' \(input 'x' axis 2\).*'x_dim3' \(input 'x' axis 3\).*--dim h=LO:HI"):
        from_onnx(m, dim_bounds=CLI_BOUNDS)
    g = from_onnx(m, dim_bounds={**CLI_BOUNDS, "h": (1, 5), "x_dim3": (2, 6)})
    assert {k: (v.lo, v.hi) for k, v in g.symbols.items()} == {
        "n": (1, 4), "x_dim1": (1, 32), "h": (1, 5), "x_dim3": (2, 6)}
    g = from_onnx(m, dim_bounds=CLI_BOUNDS, default_bound=(1, 7))  # an explicit default covers the rest
    assert (g.symbols["h"].lo, g.symbols["h"].hi) == (1, 7)
    g = from_onnx(m)  # no bounds at all: the default for every dim
    assert all((v.lo, v.hi) == (1, 2048) for v in g.symbols.values())
