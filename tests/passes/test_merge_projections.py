import numpy as np

from pass_graphs import GB, F16, assert_same, counts, hf_rms_norm
from llmc.compiler.ir import sym
from llmc.compiler.ops import Op
from llmc.compiler.verifier import verify
from llmc.passes.merge_projections import merge_projections
from llmc.passes.simplify import simplify


def _x(g):
    return g.input("x", (sym("b"), sym("s"), 16))


def test_qkv_with_transposed_weights_and_biases():
    g = GB()
    x = _x(g)
    p = "model.layers.0.self_attn"
    q, k, v = (g.linear(x, f"{p}.{n}_proj", 16, m, bias=True) for n, m in (("q", 16), ("k", 8), ("v", 8)))
    graph = g.graph(g.un(Op.EXP, q), k, v)
    out, rep = merge_projections(graph)  # no simplify first: PERMUTE(WEIGHT) operands
    verify(out)
    c = counts(out)
    assert c[Op.MATMUL] == 1 and c[Op.SLICE] == 3 and c[Op.ADD] == 1 and c[Op.PERMUTE] == 0
    assert set(out.params) == {f"{p}.q_proj+k_proj+v_proj.weight", f"{p}.q_proj+k_proj+v_proj.bias"}
    assert out.params[f"{p}.q_proj+k_proj+v_proj.weight"].shape == (16, 32)
    assert rep.counts == {"qkv_merged": 1}
    assert_same(graph, out)


def test_gate_up_after_simplify_without_bias():
    g = GB()
    x = hf_rms_norm(g, _x(g), "n")
    gate = g.linear(x, "mlp.gate_proj", 16, 24)
    up = g.linear(x, "mlp.up_proj", 16, 24)
    graph = simplify(g.graph(g.mul(g.un(Op.SILU, gate), up)))[0]
    out, rep = merge_projections(graph)
    verify(out)
    assert counts(out)[Op.MATMUL] == 1 and rep.counts == {"gate_up_merged": 1}
    (name,) = [k for k in out.params if "proj" in k]
    assert name == "mlp.gate_proj+up_proj.weight.T"  # [in, out], as the GEMM reads it
    np.testing.assert_array_equal(out.params[name][:, :24], graph.params["mlp.gate_proj.weight.T"])
    assert_same(graph, out)


def test_nothing_to_merge():
    g = GB()
    x, y = _x(g), g.input("y", (sym("b"), sym("s"), 16))
    w = g.weight("w", (16, 4))
    other_dtype = g.weight("w16", (16, 4), F16)
    graph = g.graph(g.matmul(x, w), g.matmul(y, g.weight("w2", (16, 4))), g.matmul(x, g.cast(other_dtype, x.dtype)))
    out, rep = merge_projections(graph)
    assert out is graph and rep.lines == ["nothing to merge"]
