import numpy as np
import pytest

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import ConstAttrs, NormAttrs, Op, ShapeAttrs, GeluAttrs
from llmc.compiler.symbolic import SymDim


def mlp_graph(seed: int = 0) -> Graph:
    """A LayerNorm -> GEMM -> GELU -> GEMM + residual block with dynamic batch and seq."""
    rng = np.random.default_rng(seed)
    b, s = sym("batch"), sym("seq")
    x = input_node("x", TensorType((b, s, 16), DType.F32))
    params = {"ln.w": rng.standard_normal(16), "ln.b": rng.standard_normal(16),
              "up": rng.standard_normal((16, 32)) * 0.3, "down": rng.standard_normal((32, 16)) * 0.3}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    w = {k: weight_node(k, TensorType(v.shape, DType.F32)) for k, v in params.items()}
    h = node(Op.LAYER_NORM, [x, w["ln.w"], w["ln.b"]], NormAttrs(1e-5), where="block.ln")
    h = node(Op.GELU, [node(Op.MATMUL, [h, w["up"]], where="block.up")], GeluAttrs(False))
    h = node(Op.MATMUL, [h, w["down"]], where="block.down")
    y = node(Op.ADD, [x, h])
    flat = node(Op.RESHAPE, [y], ShapeAttrs((b * s, 16)))
    scaled = node(Op.MUL, [flat, node(Op.CONST, [], ConstAttrs(0.5, DType.F32))])
    return Graph((x,), (y, scaled), params, {"batch": SymDim("batch", 1, 4), "seq": SymDim("seq", 1, 64)},
                 ("hidden", "flat"))


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory):
    from llmc.api import CompileOptions, compile_graph

    g = mlp_graph()
    compiled = compile_graph(g, CompileOptions())
    path = compiled.export(tmp_path_factory.mktemp("art") / "mlp.llmc")
    return g, compiled, path


VOCAB = 50


def embed_graph(seed: int = 0) -> Graph:
    """ids -> TAKE rows of a [VOCAB, 16] table -> LayerNorm -> GEMM: the shape of a model's
    embedding, whose ids must stay inside the table."""
    from llmc.compiler.ops import AxisAttrs

    rng = np.random.default_rng(seed)
    b, s = sym("batch"), sym("seq")
    ids = input_node("input_ids", TensorType((b, s), DType.I64))
    params = {"wte": rng.standard_normal((VOCAB, 16)), "ln.w": rng.standard_normal(16),
              "ln.b": rng.standard_normal(16), "head": rng.standard_normal((16, 8)) * 0.3}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    w = {k: weight_node(k, TensorType(v.shape, DType.F32)) for k, v in params.items()}
    h = node(Op.TAKE, [w["wte"], ids], AxisAttrs(0), where="wte")
    h = node(Op.LAYER_NORM, [h, w["ln.w"], w["ln.b"]], NormAttrs(1e-5), where="ln")
    y = node(Op.MATMUL, [h, w["head"]], where="head")
    return Graph((ids,), (y,), params, {"batch": SymDim("batch", 1, 4), "seq": SymDim("seq", 1, 32)}, ("logits",))


@pytest.fixture(scope="session")
def embed_artifact(tmp_path_factory):
    """The embedding model with its index check {input_ids in [0, VOCAB)} in the manifest."""
    from llmc.api import CompileOptions, compile_graph
    from llmc.backends.artifact import build_manifest

    g = embed_graph()
    compiled = compile_graph(g, CompileOptions())
    checks = [{"input": "input_ids", "lo": 0, "hi": VOCAB, "table": "wte"}]
    compiled.manifest["input_checks"] = build_manifest(compiled.program, _llvm(), 0,
                                                       input_checks=checks)["input_checks"]
    path = compiled.export(tmp_path_factory.mktemp("art") / "embed.llmc")
    return g, compiled, path


def _llvm():
    from llmc.backends.targets import parse_target

    return parse_target("llvm")
