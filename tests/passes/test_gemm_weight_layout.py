"""transpose_gemm_weights (passes/gemm_weight_layout.py): before/after graphs, and the same
values as the unchanged graph in the numpy interpreter on fresh random inputs (fp32, 1e-5)."""
import numpy as np

from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ir import Graph, TensorType, input_node, sym, weight_node
from llmc.compiler.ops import Op, PermuteAttrs
from llmc.compiler.symbolic import SymDim
from llmc.passes.gemm_weight_layout import transpose_gemm_weights


def _graph(dtype=DType.F32):
    rng = np.random.default_rng(0)
    s = sym("seq")
    x = input_node("x", TensorType((s, 8), dtype))
    params = {"w": rng.standard_normal((8, 12)), "shared": rng.standard_normal((12, 12)),
              "emb": rng.standard_normal((20, 12)), "scale": rng.standard_normal((12, 12))}
    params = {k: v.astype(dtype.numpy) for k, v in params.items()}
    w = {k: weight_node(k, TensorType(v.shape, dtype)) for k, v in params.items()}
    h = ir.node(Op.MATMUL, [x, w["w"]], where="up")  # [K, N]: moves
    h = ir.node(Op.MATMUL, [ir.node(Op.MATMUL, [h, w["shared"]]), w["shared"]])  # two GEMMs read one weight
    h = ir.node(Op.MATMUL, [h, ir.node(Op.MATMUL, [w["scale"], w["scale"]])])  # also a left operand: stays
    head = ir.node(Op.MATMUL, [h, ir.node(Op.PERMUTE, [w["emb"]], PermuteAttrs((1, 0)))])  # already [N, K]
    return Graph((x,), (head,), params, {"seq": SymDim("seq", 1, 8)}, ("y",))


def test_before_after():
    g = _graph()
    out, report = transpose_gemm_weights(g)
    before = {n.attrs.name: tuple(n.shape) for n in g.nodes() if n.op is Op.WEIGHT}
    after = {n.attrs.name: tuple(n.shape) for n in out.nodes() if n.op is Op.WEIGHT}
    assert before == {"w": (8, 12), "shared": (12, 12), "emb": (20, 12), "scale": (12, 12)}
    # w and shared (read only as GEMM right operands) move; emb is already [N, K]; scale is also
    # read as a left operand, so it stays
    assert after == {"w.T": (12, 8), "shared.T": (12, 12), "emb": (20, 12), "scale": (12, 12)}
    assert report.counts == {"transposed": 2}
    assert set(out.params) == set(after)
    np.testing.assert_array_equal(out.params["w.T"], g.params["w"].T)
    # every reader of a moved weight is a (1, 0) permute, which the CPU grouping folds into trans_b
    readers = [u for u in out.nodes() if any(i.op is Op.WEIGHT and i.attrs.name.endswith(".T") for i in u.inputs)]
    assert readers and all(u.op is Op.PERMUTE and u.attrs.perm == (1, 0) for u in readers)


def test_same_values_as_before():
    g = _graph()
    out, _ = transpose_gemm_weights(g)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(interpret(out, [x])[0], interpret(g, [x])[0], rtol=1e-5, atol=1e-5)


def test_leaves_other_dtypes_and_is_a_no_op_when_nothing_moves():
    g = _graph(DType.F16)
    out, report = transpose_gemm_weights(g)
    assert out is g and report.counts == {"transposed": 0}


def test_simplify_keeps_the_layout_and_names_round_trip():
    """A moved weight is marked (gemm_rows): simplify, run again on the result (as the step
    function's build does on the forward's graph), keeps its permute instead of folding it into
    a [K, N] copy that the layout pass would then copy back; and a `<name>.T` moves back to
    `<name>` (simplify.transposed_name), so forward and step name the array alike."""
    from llmc.passes.simplify import simplify, transposed_name

    after, _ = transpose_gemm_weights(_graph())
    moved = [n for n in after.nodes() if n.op is Op.WEIGHT and n.attrs.gemm_rows]
    assert {n.attrs.name for n in moved} == {"w.T", "shared.T"}
    again, _ = simplify(after)
    assert {n.attrs.name for n in again.nodes() if n.op is Op.WEIGHT and n.attrs.gemm_rows} == {"w.T", "shared.T"}
    assert all(again.params[k] is after.params[k] for k in ("w.T", "shared.T"))  # no copies
    assert transposed_name("w") == "w.T" and transposed_name("w.T") == "w" and transposed_name("e", (2, 0, 1)) == "e.perm201"
