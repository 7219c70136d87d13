import networkx as nx

from pass_graphs import GB, llama, minilm
from llmc.compiler.ir import sym
from llmc.compiler.ops import NormAttrs, Op
from llmc.compiler.program import lower_to_program
from llmc.passes.partition import HEAVY, condensed_graph, fused_grouping
from llmc.passes.pipeline import run_pipeline
from llmc.passes.report import kernels_per_layer


def check_partition(graph, groups):
    """Each computing node in one kernel (lone reshapes are views), one anchor per kernel,
    kernels in a valid order and the kernel graph acyclic."""
    owner = {}
    for gi, g in enumerate(groups):
        assert sum(n.op in HEAVY for n in g) <= 1, [n.op for n in g]
        assert any(n.op is not Op.RESHAPE for n in g)
        for n in g:
            assert n.uid not in owner
            owner[n.uid] = gi
    for n in graph.nodes():
        if n.op not in (Op.INPUT, Op.WEIGHT, Op.CONST):
            assert n.uid in owner or n.op is Op.RESHAPE, n
    dag = condensed_graph(graph, groups)
    assert nx.is_directed_acyclic_graph(dag)
    assert all(a < b for a, b in dag.edges)  # the list order is an execution order
    return owner


def _groups_with(groups, op):
    return [g for g in groups if any(n.op is op for n in g)]


def test_llama_layers_fuse_to_eight_kernels():
    graph, _ = run_pipeline(llama(n_layers=3))
    groups = fused_grouping(graph)
    check_partition(graph, groups)
    per_layer = kernels_per_layer(groups)
    assert [per_layer[i] for i in range(3)] == [8, 8, 8]
    for g in _groups_with(groups, Op.ATTENTION):  # rotary + head split in, head merge out
        ops = {n.op for n in g}
        assert {Op.SLICE, Op.NEG, Op.CONCAT, Op.PERMUTE, Op.MUL, Op.ADD} <= ops
        assert g[-1].op is Op.RESHAPE and g[-2].op is Op.PERMUTE
    swiglu = [g for g in groups if any(n.op is Op.SILU for n in g)]
    assert len(swiglu) == 3 and all({n.op for n in g} == {Op.SLICE, Op.SILU, Op.MUL} for g in swiglu)
    residual = [g for g in _groups_with(groups, Op.MATMUL) if any(n.op is Op.ADD for n in g)]
    assert len(residual) == 6  # o_proj and down_proj carry the residual add
    program = lower_to_program(graph, lambda g: groups)
    assert len(program.calls) == len(groups)


def test_minilm_layers():
    graph, _ = run_pipeline(minilm(n_layers=2))
    groups = fused_grouping(graph)
    check_partition(graph, groups)
    per_layer = kernels_per_layer(groups)
    assert per_layer[0] == per_layer[1] == 7
    gelu = _groups_with(groups, Op.GELU)
    assert all(any(n.op is Op.MATMUL for n in g) for g in gelu)  # bias + gelu epilogue


def test_merges_that_would_close_a_cycle_are_refused():
    g = GB()
    s = sym("s")
    x = g.input("x", (s, 8))
    mm1 = g.matmul(x, g.weight("w1", (8, 8)))
    norm = g.op(Op.RMS_NORM, mm1, g.weight("n", (8,)), attrs=NormAttrs(1e-6))
    mm2 = g.matmul(norm, g.weight("w2", (8, 8)))
    c = g.add(mm1, mm2)  # an epilogue of mm1 would need mm2, which needs mm1's kernel
    e1 = g.un(Op.EXP, x)
    tot = g.sum(e1)
    e2 = g.mul(e1, tot)  # fusing e2 with e1 would need the sum in between
    graph = g.graph(c, e2)
    groups = fused_grouping(graph)
    owner = check_partition(graph, groups)
    assert owner[c.uid] != owner[mm1.uid] and owner[c.uid] == owner[mm2.uid]
    assert owner[e2.uid] != owner[e1.uid]


def test_lone_reshapes_are_views():
    g = GB()
    s = sym("s")
    x = g.input("x", (s, 2, 4))
    r = g.reshape(x, (s, 8))  # read by two kernels: a view, not a kernel
    graph = g.graph(g.matmul(r, g.weight("w", (8, 8))), g.matmul(r, g.weight("w2", (8, 8))))
    groups = fused_grouping(graph)
    owner = check_partition(graph, groups)
    assert len(groups) == 2 and r.uid not in owner
    program = lower_to_program(graph, lambda g: groups)
    assert [b.role.value for b in program.buffers].count("alias") == 1
