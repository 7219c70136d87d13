import math

import pytest

from pass_graphs import GB, F16, assert_same, counts, gelu_exact, gelu_tanh, silu
from llmc.compiler.ir import sym
from llmc.compiler.ops import Op
from llmc.passes.fuse_activations import fuse_activations
from llmc.passes.simplify import simplify


def _run(graph):
    return fuse_activations(simplify(graph)[0])


def test_gelu_exact_and_tanh_spellings():
    g = GB()
    x = g.input("x", (sym("s"), 8))
    fast = g.mul(g.mul(0.5, x), g.add(1.0, g.un(Op.TANH, g.mul(g.mul(x, math.sqrt(2 / math.pi)),
                                                               g.add(1.0, g.mul(g.mul(0.044715, x), x))))))
    # erf form with the constant folded the other way: x * 0.7071..., 0.5 applied last
    alt = g.mul(g.mul(x, g.add(g.un(Op.ERF, g.mul(x, 1 / math.sqrt(2))), 1.0)), 0.5)
    graph = g.graph(gelu_exact(g, x), gelu_tanh(g, x), fast, alt)
    out, rep = _run(graph)
    assert [o.op for o in out.outputs] == [Op.GELU] * 4
    assert [o.attrs.approximate for o in out.outputs] == [False, True, True, False]
    assert counts(out)[Op.ERF] == counts(out)[Op.TANH] == 0 and rep.counts["gelu_fused"] == 4
    assert_same(graph, out)


def test_silu_spellings():
    g = GB()
    x = g.input("x", (sym("s"), 8), F16)
    e = g.div(x, g.add(1.0, g.un(Op.EXP, g.un(Op.NEG, x))))
    graph = g.graph(silu(g, x), e)
    out, rep = _run(graph)
    # the spelled-out division promoted to f32 (the 1.0 constant): silu(x) in f16, then a cast
    assert out.outputs[0].op is Op.SILU and out.outputs[1].op is Op.CAST
    assert counts(out)[Op.SILU] == 2 and counts(out)[Op.EXP] == 0 and rep.counts["silu_fused"] == 2
    assert_same(graph, out, tol=2e-3)


@pytest.mark.parametrize("half", [0.4, 0.5])
def test_wrong_constants_do_not_match(half):
    g = GB()
    x, y = g.input("x", (4,)), g.input("y", (4,))
    wrong = g.mul(g.mul(x, half), g.add(1.0, g.un(Op.ERF, g.div(x, 1.5))))
    other = g.mul(x, g.un(Op.SIGMOID, y))  # sigmoid of a different tensor
    graph = g.graph(wrong, other)
    out, rep = _run(graph)
    assert rep.counts["gelu_fused"] == rep.counts["silu_fused"] == 0
    assert counts(out)[Op.ERF] == 1 and counts(out)[Op.SIGMOID] == 1
