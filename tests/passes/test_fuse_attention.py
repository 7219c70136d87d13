import math

import numpy as np
import pytest

from pass_graphs import (BOOL, GB, I64, assert_same, causal_mask, counts, explicit_attention, repeat_kv)
from llmc.compiler import ir
from llmc.compiler.ir import sym
from llmc.compiler.ops import AttentionAttrs, AxisAttrs, Op
from llmc.compiler.verifier import verify
from llmc.passes.fuse_attention import fuse_attention
from llmc.passes.simplify import simplify

H, HK, D = 4, 2, 8


def _qkv(g: GB, hk: int = H):
    b, s = sym("b"), sym("s")
    return (g.input("q", (b, H, s, D)), g.input("k", (b, hk, s, D)), g.input("v", (b, hk, s, D)))


def _run(graph):
    out, rep = fuse_attention(simplify(graph)[0])
    verify(out)
    return out, rep


def _attention(graph):
    atts = [n for n in graph.nodes() if n.op is Op.ATTENTION]
    assert len(atts) == 1
    return atts[0]


@pytest.mark.parametrize("scale_style", ["mul", "div"])
def test_explicit_attention_without_mask(scale_style):
    g = GB()
    q, k, v = _qkv(g)
    graph = g.graph(explicit_attention(g, q, k, v, scale_style=scale_style))
    out, rep = _run(graph)
    att = _attention(out)
    assert att.inputs[:3] == (q, k, v) and att.attrs == AttentionAttrs(1 / math.sqrt(D), False, False)
    assert counts(out)[Op.SOFTMAX] == 0 and counts(out)[Op.MATMUL] == 0
    assert rep.counts["attention_fused"] == 1 and rep.counts["attention_left"] == 0
    assert_same(graph, out)


@pytest.mark.parametrize("kind", ["add", "bool", "not"])
def test_masks_from_inputs_are_kept(kind):
    g = GB()
    q, k, v = _qkv(g)
    s = sym("s")
    if kind == "add":
        mask = g.input("mask", (sym("b"), 1, s, s))
    else:
        mask = g.input("mask", (sym("b"), 1, s, s), BOOL)
    graph = g.graph(explicit_attention(g, q, k, v, mask, mask_kind=kind))
    out, _ = _run(graph)
    att = _attention(out)
    assert att.attrs.has_mask and not att.attrs.causal
    if kind == "not":  # a finite fill (finfo.min) becomes the additive mask where(~m, min, 0)
        add = att.inputs[3]
        assert add.op is Op.WHERE and add.dtype.is_float and mask in _all_inputs(add)
    else:
        assert att.inputs[3] is mask
    assert_same(graph, out)


def _all_inputs(n):
    seen, todo = [], [n]
    while todo:
        x = todo.pop()
        seen.append(x)
        todo.extend(x.inputs)
    return seen


@pytest.mark.parametrize("fill", [float(np.finfo(np.float32).min), -math.inf])
def test_fully_masked_rows_keep_the_fill_semantics(fill):
    """DeBERTa masks padded query rows everywhere: softmax(masked_fill(s, ~m, finfo.min))
    is then uniform (the mean of v), not 0; with -inf torch gives NaN, guarded to 0."""
    g = GB()
    q, k, v = _qkv(g)
    b, s = sym("b"), sym("s")
    mask = g.input("mask", (b, 1, s, s), BOOL)
    scores = g.mul(g.matmul(q, g.permute(k, (0, 1, 3, 2))), 1 / math.sqrt(D))
    p = g.softmax(g.where_(g.un(Op.NOT, mask), fill, scores))
    if math.isinf(fill):
        p = g.where_(g.op(Op.NE, p, p), 0.0, p)
    graph = g.graph(g.matmul(p, v))
    out, _ = _run(graph)
    _attention(out)
    rng = np.random.default_rng(0)
    qa, ka, va = (rng.standard_normal((2, H, 5, D)).astype(np.float32) for _ in range(3))
    m = np.ones((2, 1, 5, 5), bool)
    m[1, :, 3:, :] = False  # rows 3, 4 of batch 1: every key masked
    m[1, :, :3, 3:] = False
    from llmc.compiler.interpreter import interpret

    want, = interpret(graph, [qa, ka, va, m])
    got, = interpret(out, [qa, ka, va, m])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    full = np.broadcast_to(va[1].mean(axis=1, keepdims=True), (H, 2, D)) if fill > -math.inf else 0.0
    np.testing.assert_allclose(got[1, :, 3:], full, rtol=1e-5, atol=1e-6)


def test_scale_on_q_and_k_and_rank3_heads():
    g = GB()
    n, s = sym("b"), sym("s")  # b plays batch*heads here
    q, k, v = g.input("q", (n, s, D)), g.input("k", (n, s, D)), g.input("v", (n, s, D))
    c = D ** -0.25
    scores = g.matmul(g.mul(q, c), g.permute(g.mul(k, c), (0, 2, 1)))
    graph = g.graph(g.matmul(g.softmax(scores), v))
    out, _ = _run(graph)
    att = _attention(out)
    assert att.attrs.scale == pytest.approx(1 / math.sqrt(D)) and out.outputs[0].op is Op.RESHAPE
    assert_same(graph, out)


def test_repeat_kv_becomes_gqa():
    g = GB()
    q, k, v = _qkv(g, HK)
    graph = g.graph(explicit_attention(g, q, repeat_kv(g, k, H // HK), repeat_kv(g, v, H // HK)))
    out, rep = _run(graph)
    att = _attention(out)
    assert att.inputs[1] is k and att.inputs[2] is v and rep.counts["gqa"] == 1
    assert counts(out)[Op.EXPAND] == 0
    assert_same(graph, out)


def test_attention_node_with_repeated_kv_and_single_head_expand():
    g = GB()
    b, s = sym("b"), sym("s")
    q, k, v = _qkv(g, HK)
    k1, v1 = g.input("k1", (b, 1, s, D)), g.input("v1", (b, 1, s, D))
    attrs = AttentionAttrs(0.3, True, False)
    a = ir.node(Op.ATTENTION, [q, repeat_kv(g, k, H // HK), repeat_kv(g, v, H // HK)], attrs)
    mqa = ir.node(Op.ATTENTION, [q, g.expand(k1, (b, H, s, D)), g.expand(v1, (b, H, s, D))], attrs)
    graph = g.graph(a, mqa)
    out, rep = _run(graph)
    assert out.outputs[0].inputs[1:] == (k, v) and out.outputs[1].inputs[1:] == (k1, v1)
    assert rep.counts["gqa"] == 2
    assert_same(graph, out)


def test_repeat_interleave_by_take_becomes_gqa():
    g = GB()
    q, k, v = _qkv(g, HK)
    idx = g.op(Op.DIV, g.arange(H), g.c(H // HK, I64))  # integer division: [0, 0, 1, 1]
    rk, rv = (g.op(Op.TAKE, t, idx, attrs=AxisAttrs(1)) for t in (k, v))
    graph = g.graph(explicit_attention(g, q, rk, rv))
    out, rep = _run(graph)
    assert _attention(out).inputs[1:3] == (k, v) and rep.counts["gqa"] == 1
    assert_same(graph, out)


@pytest.mark.parametrize("kind", ["add", "bool"])
def test_causal_mask_from_arange_sets_causal(kind):
    g = GB()
    q, k, v = _qkv(g, HK)
    mask = causal_mask(g, sym("s"), kind=kind)
    graph = g.graph(explicit_attention(g, q, repeat_kv(g, k, 2), repeat_kv(g, v, 2), mask,
                                       mask_kind="add" if kind == "add" else "bool"))
    out, rep = _run(graph)
    att = _attention(out)
    assert att.attrs.causal and not att.attrs.has_mask and len(att.inputs) == 3
    assert counts(out)[Op.ARANGE] == 0 and rep.counts["causal"] == 1
    assert_same(graph, out)


def test_almost_causal_mask_is_kept():
    """A sliding window of 4: causal for short sequences only; the bound check sees it."""
    g = GB()
    q, k, v = _qkv(g)
    s = sym("s")
    i = g.reshape(g.arange(s), (s, 1))
    j = g.reshape(g.arange(s), (1, s))
    keep = g.op(Op.AND, g.op(Op.LE, j, i), g.op(Op.LT, g.sub(i, j), g.c(4, i.dtype)))
    graph = g.graph(explicit_attention(g, q, k, v, g.reshape(keep, (1, 1, s, s)), mask_kind="bool"))
    out, _ = _run(graph)
    att = _attention(out)
    assert att.attrs.has_mask and not att.attrs.causal
    assert_same(graph, out, envs=({"b": 1, "s": 7},))


def test_spelled_out_softmax():
    g = GB()
    x = g.input("x", (sym("s"), 6))
    e = g.un(Op.EXP, g.sub(x, g.op(Op.MAX, x, attrs=g.sum(x).attrs)))
    graph = g.graph(g.div(e, g.sum(e)))
    out, rep = _run(graph)
    assert out.outputs[0].op is Op.SOFTMAX and rep.counts["softmax_spelled"] == 1
    assert_same(graph, out)


def test_probabilities_used_elsewhere_block_fusion():
    g = GB()
    q, k, v = _qkv(g)
    s = g.mul(g.matmul(q, g.permute(k, (0, 1, 3, 2))), 0.25)
    p = g.softmax(s)
    graph = g.graph(g.matmul(p, v), p)  # output_attentions=True
    out, rep = _run(graph)
    assert counts(out)[Op.ATTENTION] == 0 and rep.counts["attention_left"] == 1


def test_plain_matmuls_are_left_alone():
    g = GB()
    x = g.input("x", (sym("s"), 8))
    graph = g.graph(g.matmul(g.un(Op.RELU, g.matmul(x, g.weight("w1", (8, 8)))), g.weight("w2", (8, 4))))
    out, rep = _run(graph)
    assert out is graph and rep.counts["attention_fused"] == 0
    np.testing.assert_equal(sorted(out.params), ["w1", "w2"])


def test_static_shapes_causal_mask():
    g = GB()
    q, k, v = (g.input(n, (1, H, 6, D)) for n in "qkv")
    graph = g.graph(explicit_attention(g, q, k, v, causal_mask(g, 6), mask_kind="add"))
    out, _ = _run(graph)
    att = _attention(out)
    assert att.attrs.causal and not att.attrs.has_mask
    assert_same(graph, out, envs=({},))
