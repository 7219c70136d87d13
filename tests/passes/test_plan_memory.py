from dataclasses import replace

import pytest

from pass_graphs import GB, llama, minilm
from llmc.compiler.ir import sym
from llmc.compiler.ops import Op
from llmc.compiler.program import Role, lower_to_program
from llmc.passes.partition import fused_grouping
from llmc.passes.pipeline import run_pipeline
from llmc.passes.plan_memory import live_intervals, plan_memory, verify_plan


def _unfused(graph):
    return [[n] for n in graph.nodes() if n.op not in (Op.INPUT, Op.WEIGHT, Op.CONST, Op.RESHAPE)]


@pytest.mark.parametrize("model", [llama, minilm])
@pytest.mark.parametrize("fused", [True, False])
def test_plans_are_valid_and_near_the_lower_bound(model, fused):
    graph = model(n_layers=3, seq_hi=256)
    if fused:
        graph = run_pipeline(graph)[0]
    program = plan_memory(lower_to_program(graph, fused_grouping if fused else _unfused))
    verify_plan(program)
    mp = program.notes["memory_plan"]
    assert mp["lower_bound_bytes"] <= mp["planned_bytes"] <= 1.1 * mp["lower_bound_bytes"]
    assert mp["planned_bytes"] < mp["naive_bytes"] and program.arena_bytes == mp["planned_bytes"]
    for b in program.buffers:
        if b.role in (Role.INPUT, Role.WEIGHT) or b.id in program.outputs:
            assert b.offset is None
        elif b.role is Role.TEMP:
            assert b.offset is not None and b.offset % 64 == 0


def test_elementwise_chain_runs_in_place_and_aliases_extend_lifetimes():
    g = GB(seq_hi=100)
    s = sym("s")
    x = g.input("x", (s, 16))
    a = g.un(Op.EXP, x)
    b = g.un(Op.NEG, a)
    view = g.reshape(b, (s, 4, 4))  # an alias of b, read at the very end
    c = g.un(Op.SIN, b)
    d = g.un(Op.COS, c)
    e = g.add(g.reshape(d, (s, 4, 4)), view)
    graph = g.graph(g.un(Op.TANH, e))
    program = plan_memory(lower_to_program(graph, lambda gr: [[n] for n in gr.nodes()
                                                               if n.op not in (Op.INPUT, Op.RESHAPE)]))
    verify_plan(program)
    mp = program.notes["memory_plan"]
    live = live_intervals(program)
    buf_b = program.calls[1].args[-1]
    assert live[buf_b] == (1, 4)  # written by neg, read through the view by the add
    assert mp["in_place"] >= 2  # neg over exp's output, cos over sin's output, ...
    size = 100 * 16 * 4
    assert mp["planned_bytes"] == mp["lower_bound_bytes"] == 2 * size


def test_verify_plan_catches_overlaps():
    graph = run_pipeline(llama(n_layers=1))[0]
    program = plan_memory(lower_to_program(graph, fused_grouping))
    bad = program.with_buffers([replace(b, offset=0) if b.offset is not None else b for b in program.buffers],
                               program.arena_bytes)
    with pytest.raises(AssertionError, match="overlap"):
        verify_plan(bad)
