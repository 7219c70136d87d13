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


def test_constant_and_input_outputs_are_computed(tmp_path):
    """Outputs that are a scalar CONST, a FULL, a weight or an input itself: the CONST gets
    a one-node kernel filling its 0-d buffer; all survive export and a runtime-only load."""
    import llmc
    from llmc.api import CompileOptions, compile_graph
    from llmc.compiler.ops import FullAttrs

    b = sym("b")
    x = input_node("x", TensorType((b, 4), DType.F32))
    w = weight_node("w", TensorType((4,), DType.F32))
    c = node(Op.CONST, [], ConstAttrs(2.5, DType.F32))
    full = node(Op.FULL, [], FullAttrs((3,), 7, DType.I64))
    g = Graph((x,), (node(Op.ADD, [x, c]), c, full, w, x), {"w": np.arange(4, dtype=np.float32)},
              {"b": SymDim("b", 1, 4)})
    p = lower_to_program(g)
    assert any(k.body[0].op is Op.FULL and not k.params for k in p.kernels.values())
    compiled = compile_graph(g, CompileOptions())
    xv = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = [xv + 2.5, np.float32(2.5), np.full(3, 7, np.int64), np.arange(4, dtype=np.float32), xv]
    for run in (compiled, llmc.load(compiled.export(tmp_path / "c.llmc"))):
        got = run(x=xv)
        assert len(got) == len(want)
        for o, r in zip(got, want):
            assert o.shape == np.shape(r) and o.dtype == np.asarray(r).dtype
            np.testing.assert_array_equal(o, r)
