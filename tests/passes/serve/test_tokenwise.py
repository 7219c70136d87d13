"""check_tokenwise on hand-built graphs: what keeps the token axis whole and what does not."""
from __future__ import annotations

import pytest

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import AxisAttrs, Op, PermuteAttrs, ReduceAttrs, ShapeAttrs
from llmc.compiler.symbolic import SymDim
from llmc.errors import LLMCError
from llmc.passes.serve import check_tokenwise

T = sym("tokens")
SYMS = {"tokens": SymDim("tokens", 1, 64)}


def _graph(build):
    x = input_node("x", TensorType((1, T, 16), DType.F32))
    return Graph((x,), (build(x),), {}, SYMS)


def test_token_wise_ops_pass():
    w = weight_node("w", TensorType((16, 16), DType.F32))

    def build(x):
        h = node(Op.MATMUL, [x, w])
        h = node(Op.RESHAPE, [h], ShapeAttrs((1, T, 4, 4)))
        h = node(Op.PERMUTE, [h], PermuteAttrs((0, 2, 1, 3)))
        h = node(Op.SOFTMAX, [h], AxisAttrs(3))
        return node(Op.SUM, [h], ReduceAttrs((3,), False))

    check_tokenwise(_graph(build), {"tokens"})


@pytest.mark.parametrize("build, match", [
    (lambda x: node(Op.SUM, [x], ReduceAttrs((1,), True), where="pool"), "sum at pool works across the token axis"),
    (lambda x: node(Op.SOFTMAX, [x], AxisAttrs(1), where="sm"), "softmax at sm"),
    (lambda x: node(Op.CUMSUM, [x], AxisAttrs(1), where="cs"), "cumsum at cs"),
    (lambda x: node(Op.RESHAPE, [x], ShapeAttrs((T * 16,)), where="flat"), "flat folds the token axis"),
    (lambda x: node(Op.RESHAPE, [node(Op.PERMUTE, [x], PermuteAttrs((0, 2, 1)))], ShapeAttrs((1, 16, T)),
                    where="re"), None),
    (lambda x: node(Op.MATMUL, [node(Op.PERMUTE, [x], PermuteAttrs((0, 2, 1))), x], where="qk"),
     "matmul at qk works across the token axis"),
    (lambda x: node(Op.CONCAT, [x, x], AxisAttrs(1), where="cat"), "folds the token axis"),
])
def test_token_mixing_is_refused(build, match):
    g = _graph(build)
    if match is None:
        check_tokenwise(g, {"tokens"})  # a reshape that keeps the axis whole (after a permute) is fine
        return
    with pytest.raises(LLMCError, match=match):
        check_tokenwise(g, {"tokens"})


def test_quantized_matmul_row_scales_are_per_token():
    """A W8A8 / FP8 QMATMUL's 4th input holds one scale per row of x (per token): token-wise, unlike
    its weight operands, which are contracted whole (a weight-only QMATMUL's 4th input is its zero
    points, a weight)."""
    from llmc.compiler.ops import QMatmulAttrs

    qw = weight_node("q", TensorType((8, 16), DType.I8))
    s = weight_node("s", TensorType((8, 1), DType.F32))

    def build(x):
        sx = node(Op.MAX, [node(Op.ABS, [x])], ReduceAttrs((2,), True))
        return node(Op.QMATMUL, [x, qw, s, sx], QMatmulAttrs(8, 16, True, DType.F32, 8), where="mm")

    check_tokenwise(_graph(build), {"tokens"})
