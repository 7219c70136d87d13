"""Graph -> Program lowering: kernels, buffers, aliases, kernel sharing."""
import numpy as np

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import ConstAttrs, Op, ShapeAttrs
from llmc.compiler.program import Role, lower_to_program
from llmc.compiler.symbolic import SymDim


def test_reshape_is_an_alias_and_identical_kernels_are_shared():
    b, s = sym("b"), sym("s")
    x = input_node("x", TensorType((b, s, 8), DType.F32))
    w = weight_node("w", TensorType((8, 8), DType.F32))
    h1 = node(Op.MATMUL, [x, w])
    h2 = node(Op.MATMUL, [node(Op.RELU, [h1]), w])  # same structure as h1's kernel
    out = node(Op.ADD, [node(Op.RESHAPE, [h2], ShapeAttrs((b * s, 8))), node(Op.CONST, [], ConstAttrs(2.0, DType.F32))])
    g = Graph((x,), (out,), {"w": np.zeros((8, 8), np.float32)}, {"b": SymDim("b"), "s": SymDim("s")})
    p = lower_to_program(g)
    assert [c.kernel for c in p.calls] == ["matmul_0", "relu_0", "matmul_0", "add_0"]
    assert len(p.kernels) == 3
    roles = [b.role for b in p.buffers]
    assert roles.count(Role.ALIAS) == 1 and roles.count(Role.WEIGHT) == 1
    add = p.kernels["add_0"]
    assert [n.op for n in add.body] == [Op.CONST, Op.ADD]  # the scalar is an immediate
    assert add.symbols == ("b", "s")
    alias = next(b for b in p.buffers if b.role is Role.ALIAS)
    assert p.buffers[alias.alias_of].role is Role.TEMP
