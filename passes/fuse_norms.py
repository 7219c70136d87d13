"""RMSNorm and LayerNorm spelled out in primitive ops -> Op.RMS_NORM / Op.LAYER_NORM.

Matched spellings (any association/order of products, casts anywhere on x):
  rms:   x * rsqrt(mean(x^2) + eps) [* w],  x / sqrt(mean(x*x) + eps) [* w],
         w * cast(cast(x, f32) * rsqrt(...), dtype)   (HF Llama/T5/Gemma, w may be 1 + w')
  layer: d = x - mean(x);  d / sqrt(mean(d^2) + eps) [* w] [+ b]  (rsqrt or 1/sqrt too)
mean may be sum(...) / D. The weight may be any node of shape [D] (or [1, .., D]).
"""
from __future__ import annotations

import time

from ..compiler.ir import Node
from ..compiler.ops import FullAttrs, NormAttrs, Op, ShapeAttrs
from .pattern import Alt, Const, Match, MeanLast, OptCast, P, Prod, Var, rsqrt, sqrt
from .rewrite import Rule, rewrite
from .report import PassReport

X = OptCast(Var("x"))
EPS = Const(name="eps", pred=lambda v: 0 <= v < 1)
W = Var("w")
B = Var("b")


def _inv_rms():
    ms = MeanLast(X ** 2)
    return ms + EPS


def _normalized_rms() -> P:
    return Alt(Prod(X, rsqrt(_inv_rms())), P(Op.DIV, X, sqrt(_inv_rms())))


RMS = _normalized_rms()
RMS_W = Alt(Prod(OptCast(RMS), W), Prod(X, rsqrt(_inv_rms()), W))

# LayerNorm: d = x - mean(x); the same (named) d node feeds the variance and the output.
D = P(Op.SUB, X, MeanLast(X), name="d")
_VAR = MeanLast(D ** 2) + EPS
LN = Alt(Prod(D, rsqrt(_VAR)), P(Op.DIV, D, sqrt(_VAR)))
LN_W = Alt(Prod(OptCast(LN), W), Prod(D, rsqrt(_VAR), W))


def _vector(m: Match, name: str, x: Node) -> Node | None:
    """A [D] operand for the norm from a node broadcast against x's last axis."""
    v = m[name]
    d = x.shape[-1]
    shape = tuple(v.shape)
    if not shape or shape[-1] != d or any(s != 1 for s in shape[:-1]) or len(shape) > x.type.rank:
        return None
    return v if len(shape) == 1 else m.make(Op.RESHAPE, [v], ShapeAttrs((d,)))


def _const_vec(m: Match, x: Node, value: float) -> Node:
    return m.make(Op.FULL, [], FullAttrs((x.shape[-1],), value, x.dtype))


def _rms(with_weight: bool):
    def fn(m: Match) -> Node | None:
        x = m["x"]
        if not x.dtype.is_float or x.type.rank < 1:
            return None
        w = _vector(m, "w", x) if with_weight else _const_vec(m, x, 1.0)
        if w is None:
            return None
        return m.make(Op.RMS_NORM, [x, w], NormAttrs(m.const("eps")))
    fn.__name__ = "rms_norm"
    return fn


def _layer(with_weight: bool, with_bias: bool):
    def fn(m: Match) -> Node | None:
        x = m["x"]
        if not x.dtype.is_float or x.type.rank < 1:
            return None
        w = _vector(m, "w", x) if with_weight else _const_vec(m, x, 1.0)
        b = _vector(m, "b", x) if with_bias else _const_vec(m, x, 0.0)
        if w is None or b is None:
            return None
        return m.make(Op.LAYER_NORM, [x, w, b], NormAttrs(m.const("eps")))
    fn.__name__ = "layer_norm"
    return fn


RULES = [
    # biggest spellings first: a smaller match rooted lower down is dropped as dead code
    Rule("layer_norm", P(Op.ADD, OptCast(LN_W), B), _layer(True, True)),
    Rule("layer_norm", P(Op.ADD, OptCast(LN), B), _layer(False, True)),
    Rule("layer_norm", LN_W, _layer(True, False)),
    Rule("layer_norm", LN, _layer(False, False)),
    Rule("rms_norm", RMS_W, _rms(True)),
    Rule("rms_norm", RMS, _rms(False)),
]


def _left(graph) -> int:
    """Spelled-out norms still in the graph: sqrt/rsqrt fed by a last-axis mean."""
    n_left = 0
    for n in graph.nodes():
        if n.op in (Op.SQRT, Op.RSQRT):
            src = n.inputs[0]
            for _ in range(3):
                if src.op in (Op.MEAN, Op.SUM):
                    n_left += 1
                    break
                if not src.inputs:
                    break
                src = src.inputs[0]
    return n_left


def fuse_norms(graph) -> tuple:
    t0 = time.perf_counter()
    before = {op: sum(1 for n in graph.nodes() if n.op is op) for op in (Op.RMS_NORM, Op.LAYER_NORM)}
    graph, counts = rewrite(graph, RULES)
    after = {op: sum(1 for n in graph.nodes() if n.op is op) for op in (Op.RMS_NORM, Op.LAYER_NORM)}
    fused = {op: after[op] - before[op] for op in after}
    left = _left(graph)
    report = PassReport("fuse_norms", {"rms_norm_fused": fused[Op.RMS_NORM], "layer_norm_fused": fused[Op.LAYER_NORM],
                                       "norm_left": left},
                        [f"rms_norm: {fused[Op.RMS_NORM]} fused", f"layer_norm: {fused[Op.LAYER_NORM]} fused",
                         f"{left} left"])
    report.seconds = time.perf_counter() - t0
    return graph, report
