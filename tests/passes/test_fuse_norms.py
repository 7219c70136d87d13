import pytest

from pass_graphs import (GB, F16, F32, assert_same, counts, hf_rms_norm, layer_norm_spelled, rms_norm_div)
from llmc.compiler.ir import sym
from llmc.compiler.ops import Op
from llmc.compiler.verifier import verify
from llmc.passes.fuse_norms import fuse_norms
from llmc.passes.simplify import simplify


def _fused(graph):
    out, rep = fuse_norms(simplify(graph)[0])
    verify(out)
    return out, rep


@pytest.mark.parametrize("dtype", [F32, F16])
def test_hf_llama_rms_norm_with_casts(dtype):
    g = GB()
    x = g.input("x", (sym("b"), sym("s"), 16), dtype)
    graph = g.graph(hf_rms_norm(g, x, "norm"))
    out, rep = _fused(graph)
    c = counts(out)
    assert c[Op.RMS_NORM] == 1 and c[Op.RSQRT] == c[Op.MEAN] == c[Op.POW] == 0
    norm = next(n for n in out.nodes() if n.op is Op.RMS_NORM)
    assert norm.inputs[0] is x and norm.attrs.eps == pytest.approx(1e-6)  # reads x before the upcast
    assert rep.counts["rms_norm_fused"] == 1 and rep.counts["norm_left"] == 0
    assert_same(graph, out, tol=1e-4 if dtype is F32 else 2e-2)


def test_rms_norm_div_sqrt_and_sum_over_d():
    g = GB()
    x = g.input("x", (sym("s"), 12))
    graph = g.graph(rms_norm_div(g, x, "n"))
    out, _ = _fused(graph)
    assert counts(out)[Op.RMS_NORM] == 1 and counts(out)[Op.SQRT] == 0
    assert_same(graph, out)


def test_rms_norm_without_weight_and_gemma_one_plus_w():
    g = GB()
    x = g.input("x", (sym("s"), 8))
    inv = g.div(1.0, g.un(Op.SQRT, g.add(g.mean(g.mul(x, x)), 1e-6)))
    plain = g.mul(x, inv)
    w = g.weight("w", (8,))
    x2 = g.input("x2", (sym("s"), 8))
    gemma = g.mul(g.mul(x2, g.un(Op.RSQRT, g.add(g.mean(g.op(Op.POW, x2, 2.0)), 1e-6))), g.add(w, 1.0))
    graph = g.graph(plain, gemma)
    out, _ = _fused(graph)
    assert counts(out)[Op.RMS_NORM] == 2 and counts(out)[Op.MEAN] == 0
    assert_same(graph, out)


@pytest.mark.parametrize("style", ["div", "mul"])
def test_layer_norm_spelled_out(style):
    g = GB()
    x = g.input("x", (sym("b"), sym("s"), 16))
    graph = g.graph(layer_norm_spelled(g, x, "ln", eps=1e-5, style=style))
    out, rep = _fused(graph)
    c = counts(out)
    assert c[Op.LAYER_NORM] == 1 and c[Op.MEAN] == c[Op.SQRT] == c[Op.SUB] == 0
    ln = out.outputs[0]
    assert ln.op is Op.LAYER_NORM and ln.inputs[1].attrs.name == "ln.weight" and ln.inputs[2].attrs.name == "ln.bias"
    assert rep.counts["layer_norm_fused"] == 1
    assert_same(graph, out)


def test_layer_norm_without_affine():
    g = GB()
    x = g.input("x", (sym("s"), 8))
    d = g.sub(x, g.mean(x))
    graph = g.graph(g.mul(d, g.un(Op.RSQRT, g.add(g.mean(g.mul(d, d)), 1e-5))))
    out, _ = _fused(graph)
    assert counts(out)[Op.LAYER_NORM] == 1
    assert_same(graph, out)


def test_near_misses_stay_unfused():
    g = GB()
    x = g.input("x", (sym("s"), 8))
    # mean over the wrong axis, a non-square, and a weight of the wrong shape
    axis0 = g.op(Op.MEAN, g.mul(x, x), attrs=type(g.mean(x).attrs)((0,), True))
    a = g.mul(x, g.un(Op.RSQRT, g.add(axis0, 1e-6)))
    b = g.mul(x, g.un(Op.RSQRT, g.add(g.mean(g.op(Op.POW, x, 4.0)), 1e-6)))
    graph = g.graph(a, b)
    out, rep = _fused(graph)
    assert counts(out)[Op.RMS_NORM] == 0 and rep.counts["norm_left"] == 2
    assert_same(graph, out)


def test_shared_statistics_block_fusion():
    """If the mean-square is also a graph output, fusing would compute it twice: leave it."""
    g = GB()
    x = g.input("x", (sym("s"), 8))
    ms = g.mean(g.mul(x, x))
    graph = g.graph(g.mul(x, g.un(Op.RSQRT, g.add(ms, 1e-6))), ms)
    out, _ = _fused(graph)
    assert counts(out)[Op.RMS_NORM] == 0
