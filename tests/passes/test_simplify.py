import numpy as np

from pass_graphs import GB, F16, F32, I64, assert_same, counts
from llmc.compiler.ir import sym
from llmc.compiler.ops import AxisAttrs, Op
from llmc.compiler.verifier import verify
from llmc.passes.simplify import cse, simplify


def test_permute_of_weight_becomes_pretransposed_weight():
    g = GB()
    x = g.input("x", (sym("b"), sym("s"), 8))
    y = g.linear(x, "fc", 8, 6)
    graph = g.graph(y)
    out, rep = simplify(graph)
    verify(out)
    mm = out.outputs[0]
    assert mm.op is Op.MATMUL and mm.inputs[1].op is Op.WEIGHT and tuple(mm.inputs[1].shape) == (8, 6)
    assert set(out.params) == {"fc.weight.T"} and out.params["fc.weight.T"].flags["C_CONTIGUOUS"]
    assert rep.counts["permute_weight"] == 1
    assert_same(graph, out)


def test_tied_weight_is_not_duplicated():
    g = GB()
    ids = g.input("ids", (sym("s"),), I64)
    w = g.weight("emb", (20, 8))
    h = g.op(Op.TAKE, w, ids, attrs=AxisAttrs(0))
    logits = g.matmul(h, g.permute(w, (1, 0)))
    graph = g.graph(logits)
    out, _ = simplify(graph)
    assert counts(out)[Op.PERMUTE] == 1 and set(out.params) == {"emb"}


def test_identity_ops_and_chains_fold():
    g = GB()
    s = sym("s")
    x = g.input("x", (2, s, 8))
    a = g.cast(x, F32)  # same dtype
    a = g.reshape(g.reshape(a, (2 * s, 8)), (2, s, 8))  # back to the same shape
    a = g.permute(g.permute(a, (0, 2, 1)), (0, 2, 1))  # identity permute
    a = g.expand(a, (2, s, 8))
    a = g.slice(a, 2, 0, 8)
    b = g.reshape(g.reshape(x, (2, s, 2, 4)), (2 * s, 8))
    c = g.cast(g.cast(g.cast(x, F16), F32), F32)  # f32->f16 is lossy: one cast pair must stay
    d = g.add(g.mul(x, 1.0), 0.0)
    graph = g.graph(g.un(Op.EXP, a), b, c, d)
    out, rep = simplify(graph)
    verify(out)
    assert out.outputs[0].inputs[0] is x
    assert out.outputs[1].op is Op.RESHAPE and out.outputs[1].inputs[0] is x
    assert counts(out)[Op.CAST] == 2 and out.outputs[3] is x
    assert_same(graph, out, tol=1e-2)


def test_widening_casts_fold():
    g = GB()
    x = g.input("x", (4,), F16)
    graph = g.graph(g.cast(g.cast(x, F32), F16))
    out, _ = simplify(graph)
    assert out.outputs[0] is x


def test_cse_merges_identical_nodes_and_scalar_constants_fold():
    g = GB()
    x = g.input("x", (sym("s"), 4))
    a1, a2 = g.un(Op.EXP, x), g.un(Op.EXP, x)
    scale = g.div(1.0, g.un(Op.SQRT, g.c(16.0)))
    graph = g.graph(g.mul(g.add(a1, a2), scale))
    out, rep = simplify(graph)
    c = counts(out)
    assert c[Op.EXP] == 1 and c[Op.SQRT] == 0 and c[Op.DIV] == 0
    const = [n for n in out.nodes() if n.op is Op.CONST]
    assert len(const) == 1 and const[0].attrs.value == 0.25
    assert_same(graph, out)


def test_cse_keeps_distinct_constants_apart():
    g = GB()
    x = g.input("x", (4,))
    graph = g.graph(g.add(g.mul(x, g.c(0.0)), g.mul(x, g.c(-0.0))))
    out, merged = cse(graph)
    assert merged == 0


def test_nothing_to_simplify_is_unchanged():
    g = GB()
    x = g.input("x", (sym("s"), 4))
    graph = g.graph(g.un(Op.EXP, g.add(x, g.weight("b", (4,)))))
    out, rep = simplify(graph)
    assert out is graph and rep.lines == []
    np.testing.assert_equal(list(out.params), ["b"])


def _padding_mask_graph(ge_const: int = 0):
    """HF's bidirectional padding mask: (q_idx >= c) & pad[b, kv_idx], [b, 1, s, s]."""
    from llmc.compiler import ir
    from llmc.compiler.ops import AttentionAttrs
    from pass_graphs import BOOL

    g = GB()
    b, s = sym("b"), sym("s")
    am = g.input("am", (b, s), I64)
    q, k, v = (g.input(n, (b, 2, s, 4)) for n in "qkv")
    pad = g.reshape(g.cast(am, BOOL), (b, 1, 1, s))
    rows = g.op(Op.GE, g.reshape(g.arange(s), (1, 1, s, 1)), g.c(ge_const, I64))
    mask = g.op(Op.AND, g.op(Op.AND, g.full((), True, BOOL), rows), pad)
    att = ir.node(Op.ATTENTION, [q, k, v, mask], AttentionAttrs(0.5, False, True))
    return g.graph(att)


def test_padding_mask_becomes_a_key_vector():
    graph = _padding_mask_graph()
    assert tuple(graph.outputs[0].inputs[3].shape) == (sym("b"), 1, sym("s"), sym("s"))
    out, rep = simplify(graph)
    verify(out)
    mask = out.outputs[0].inputs[3]
    assert tuple(mask.shape) == (sym("b"), 1, 1, sym("s"))  # broadcast over the rows by the attention
    assert counts(out)[Op.GE] == 0 and counts(out)[Op.AND] == 0
    assert rep.counts["range_compare"] == 1 and rep.counts["mask_before_expand"] == 1
    assert_same(graph, out)


def test_range_compare_folds_only_what_the_range_decides():
    out, _ = simplify(_padding_mask_graph(ge_const=1))  # q_idx >= 1 is false for row 0: must stay
    assert counts(out)[Op.GE] == 1
    assert tuple(out.outputs[0].inputs[3].shape) == (sym("b"), 1, sym("s"), sym("s"))
    g = GB()
    s = sym("s")
    x, r = g.input("x", (s,)), g.arange(s)
    cmps = [g.op(Op.LT, r, g.c(0, I64)), g.op(Op.GT, r, g.c(-1, I64)), g.op(Op.LE, r, g.c(0, I64))]
    graph = g.graph(*(g.add(x, g.cast(c, F32)) for c in cmps))
    out, _ = simplify(graph)
    assert out.outputs[0] is x  # x + cast(False) -> x
    folded = [o.inputs[1].inputs[0] for o in out.outputs[1:]]
    assert [n.op for n in folded] == [Op.FULL, Op.LE] and folded[0].attrs.value is True
    assert_same(graph, out)
