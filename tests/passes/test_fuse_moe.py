"""fuse_moe: gathered-expert mat-vecs (transformers' batched_mm experts) -> ROUTED_MATMUL,
checked on the rewritten IR and against the numpy reference before and after."""
from pass_graphs import GB, I64, assert_same, counts
from llmc.compiler.ir import Node, sym
from llmc.compiler.ops import AxisAttrs, Op, ReduceAttrs, TopkAttrs
from llmc.compiler.verifier import verify
from llmc.passes.fuse_moe import fuse_moe
from llmc.passes.pipeline import DEFAULT_PIPELINE, run_pipeline

E, TOP, H, I = 6, 2, 16, 24


def _router(g: GB, h: Node):
    """softmax router, top-2: (ids [2*T] flattened, weights [2*T, 1])."""
    probs = g.softmax(g.linear(h, "mlp.gate", H, E))
    idx = g.op(Op.TOPK, probs, attrs=TopkAttrs(TOP, 1))
    vals = g.op(Op.GATHER, probs, idx, attrs=AxisAttrs(1))
    vals = g.div(vals, g.sum(vals))
    t = h.shape[0]
    return g.reshape(idx, (TOP * t,)), g.reshape(vals, (TOP * t, 1))


def _batched_mm_moe(g: GB, transposed: bool = False) -> Node:
    """Mixtral's experts in transformers' batched_mm form, as the frontend converts it."""
    b, s = sym("b"), sym("s")
    x = g.input("x", (b, s, H))
    t = b * s
    h = g.reshape(x, (t, H))
    ids, wts = _router(g, h)
    rows = g.reshape(g.expand(g.reshape(h, (t, 1, H)), (t, TOP, H)), (TOP * t, H))
    if transposed:  # gpt-oss layout: w [E, in, out], rows as [S, 1, in] @ w[ids]
        gu_w, down_w = g.weight("experts.gate_up_proj", (E, H, 2 * I)), g.weight("experts.down_proj", (E, I, H))
        gu = g.reshape(g.matmul(g.reshape(rows, (TOP * t, 1, H)), g.op(Op.INDEX, gu_w, ids)), (TOP * t, 2 * I))
    else:
        gu_w, down_w = g.weight("experts.gate_up_proj", (E, 2 * I, H)), g.weight("experts.down_proj", (E, H, I))
        gu = g.reshape(g.matmul(g.op(Op.INDEX, gu_w, ids), g.reshape(rows, (TOP * t, H, 1))), (TOP * t, 2 * I))
    act = g.mul(g.un(Op.SILU, g.slice(gu, 1, 0, I)), g.slice(gu, 1, I, 2 * I))
    if transposed:
        down = g.matmul(g.reshape(act, (TOP * t, 1, I)), g.op(Op.INDEX, down_w, ids))
    else:
        down = g.matmul(g.op(Op.INDEX, down_w, ids), g.reshape(act, (TOP * t, I, 1)))
    out = g.mul(g.reshape(down, (TOP * t, H)), wts)
    summed = g.op(Op.SUM, g.reshape(out, (t, TOP, H)), attrs=ReduceAttrs((1,), False))
    return g.reshape(summed, (b, s, H))


def _gathered_matmuls(graph) -> int:
    return sum(1 for n in graph.nodes() if n.op is Op.MATMUL and any(i.op is Op.INDEX for i in n.inputs))


def test_batched_mm_experts_become_routed_matmuls():
    g = GB()
    graph = g.graph(_batched_mm_moe(g))
    assert _gathered_matmuls(graph) == 2
    out, rep = fuse_moe(graph)
    verify(out)
    c = counts(out)
    assert c[Op.ROUTED_MATMUL] == 2 and c[Op.INDEX] == 0 and _gathered_matmuls(out) == 0
    assert c[Op.MATMUL] == 1  # the router's
    assert all(n.attrs.weight_nk for n in out.nodes() if n.op is Op.ROUTED_MATMUL)
    # the routed op reads the expert weights themselves, not a gathered copy
    assert {n.inputs[1].op for n in out.nodes() if n.op is Op.ROUTED_MATMUL} == {Op.WEIGHT}
    assert rep.counts == {"routed_matmul_fused": 2, "gathered_matmul_left": 0}
    assert rep.lines == ["routed_matmul: 2 fused, 0 gathered-expert matmuls left"]
    assert_same(graph, out, envs=({"b": 2, "s": 5}, {"b": 1, "s": 1}, {"b": 1, "s": 3}))


def test_transposed_expert_weights():
    g = GB()
    graph = g.graph(_batched_mm_moe(g, transposed=True))
    out, rep = fuse_moe(graph)
    verify(out)
    assert counts(out)[Op.ROUTED_MATMUL] == 2 and _gathered_matmuls(out) == 0
    assert not any(n.attrs.weight_nk for n in out.nodes() if n.op is Op.ROUTED_MATMUL)
    assert_same(graph, out)


def test_default_pipeline_keeps_the_routed_form():
    g = GB()
    graph = g.graph(_batched_mm_moe(g))
    out, reports = run_pipeline(graph, DEFAULT_PIPELINE, verify_each=True)
    assert counts(out)[Op.ROUTED_MATMUL] == 2 and _gathered_matmuls(out) == 0
    assert {r.name for r in reports} >= {"fuse_moe"}
    assert_same(graph, out)


def test_other_gathered_matmuls_are_left_and_counted():
    g = GB()
    s = sym("s")
    w = g.weight("w", (E, 8, H))
    ids = g.input("ids", (s,), I64)
    two_cols = g.matmul(g.op(Op.INDEX, w, ids), g.input("v", (s, H, 2)))  # not a mat-vec
    graph = g.graph(two_cols)
    out, rep = fuse_moe(graph)
    assert out is graph or counts(out) == counts(graph)
    assert rep.counts == {"routed_matmul_fused": 0, "gathered_matmul_left": 1}


def test_graph_without_experts_is_unchanged():
    g = GB()
    x = g.input("x", (sym("b"), sym("s"), H))
    graph = g.graph(g.linear(x, "proj", H, 8))
    out, rep = fuse_moe(graph)
    assert out is graph and rep.lines == [] and rep.counts["routed_matmul_fused"] == 0
