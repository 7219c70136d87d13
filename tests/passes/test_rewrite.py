from pass_graphs import GB, assert_same, counts
from llmc.compiler.ops import Op
from llmc.passes.pattern import P, Var
from llmc.passes.rewrite import Rule, rewrite, substitute


def test_rewrite_declines_and_counts_live_replacements():
    g = GB()
    x = g.input("x", (4,))
    graph = g.graph(g.un(Op.NEG, g.un(Op.NEG, x)), g.un(Op.NEG, g.un(Op.EXP, x)))
    calls = []

    def double_neg(m):
        calls.append(m.root)
        return m["x"]

    def never(m):
        return None

    rules = [Rule("never", P(Op.NEG, Var("x")), never), Rule("double_neg", P(Op.NEG, P(Op.NEG, Var("x"))), double_neg)]
    out, c = rewrite(graph, rules)
    assert c == {"never": 0, "double_neg": 1}
    assert out.outputs[0] is x and counts(out)[Op.NEG] == 1
    assert_same(graph, out, envs=({},))


def test_exclusive_rule_skips_shared_interior():
    g = GB()
    x = g.input("x", (4,))
    inner = g.un(Op.EXP, x)
    graph = g.graph(g.un(Op.NEG, inner), inner)  # exp is also an output
    rule = Rule("neg_exp", P(Op.NEG, P(Op.EXP, Var("x"))), lambda m: m.make(Op.SIGMOID, [m["x"]]))
    out, c = rewrite(graph, [rule])
    assert c["neg_exp"] == 0 and out is graph
    out, c = rewrite(graph, [Rule("neg_exp", rule.pattern, rule.replace, exclusive=False)])
    assert c["neg_exp"] == 1


def test_tuple_rules_and_unchanged_graph():
    g = GB()
    x = g.input("x", (4,))
    graph = g.graph(g.add(x, x))
    out, c = rewrite(graph, [(P(Op.MUL, Var("a"), Var("b")), lambda m: m["a"])])
    assert out is graph and sum(c.values()) == 0


def test_substitute_rebases_replacements_on_rebuilt_nodes():
    g = GB()
    x = g.input("x", (4,))
    a = g.un(Op.EXP, x)
    b = g.un(Op.NEG, a)
    c = g.un(Op.SIN, b)
    graph = g.graph(c)
    # replace a by sigmoid(x) and c by cos(b): cos must read the rebuilt b
    out = substitute(graph, {a.uid: g.un(Op.SIGMOID, x), c.uid: g.un(Op.COS, b)})
    assert [n.op for n in out.nodes()] == [Op.INPUT, Op.SIGMOID, Op.NEG, Op.COS]
