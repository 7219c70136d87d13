import math

from pass_graphs import GB, F16, F32
from llmc.compiler.ir import sym
from llmc.compiler.ops import Op
from llmc.passes.pattern import Const, Match, OptCast, P, Prod, Var, erf, trace
from llmc.passes.rewrite import _Context


def _matches(pattern, node, graph) -> list[dict]:
    m = Match(node, _Context(graph))
    return [dict(m.nodes) for _ in pattern.match(node, m)]


def test_prod_matches_any_association_and_order():
    g = GB()
    x, y = g.input("x", (sym("s"), 4)), g.input("y", (sym("s"), 4))
    outs = [g.mul(g.mul(0.5, x), y), g.mul(x, g.mul(y, 0.5)), g.mul(g.div(y, 2.0), x)]
    graph = g.graph(*outs)
    pat = Prod(Const(0.5), Var("a"), Var("b"))
    for o in outs:
        found = {(m["a"].attrs.name, m["b"].attrs.name) for m in _matches(pat, o, graph)}
        assert found == {("x", "y"), ("y", "x")}


def test_commutative_add_and_consistent_binding():
    g = GB()
    x, y = g.input("x", (4,)), g.input("y", (4,))
    graph = g.graph(g.add(1.0, g.mul(x, x)), g.mul(x, y))
    square_plus_one = P(Op.ADD, Prod(Var("v"), Var("v")), Const(1.0))
    assert _matches(square_plus_one, graph.outputs[0], graph)
    assert not _matches(Prod(Var("v"), Var("v")), graph.outputs[1], graph)


def test_opt_cast_skips_casts():
    g = GB()
    x = g.input("x", (4,), F16)
    node = g.un(Op.EXP, g.cast(g.cast(x, F32), F32))
    graph = g.graph(node)
    ms = _matches(P(Op.EXP, OptCast(Var("v"))), node, graph)
    assert ms[0]["v"] is x and len(ms) == 3  # through both casts first, then fewer


def test_trace_builds_patterns_from_code():
    pat = trace(lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))))
    g = GB()
    x = g.input("x", (3,))
    node = g.mul(g.mul(x, g.add(g.un(Op.ERF, g.mul(x, 1 / math.sqrt(2))), 1.0)), 0.5)
    assert _matches(pat, node, g.graph(node))


def test_check_and_mean_last():
    from llmc.passes.pattern import Check, MeanLast

    g = GB()
    x = g.input("x", (3, 8))
    spelled = g.mul(g.sum(x), 1 / 8)  # mean as sum * (1/D)
    wrong = g.div(g.sum(x), 4.0)
    graph = g.graph(spelled, wrong, g.mean(x))
    pat = MeanLast(Var("v"))
    assert _matches(pat, spelled, graph) and _matches(pat, graph.outputs[2], graph)
    assert not _matches(pat, wrong, graph)
    assert not _matches(Check(pat, lambda m: m.nodes["v"].shape[0] == 4), spelled, graph)
