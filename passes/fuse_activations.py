"""Activations spelled out -> Op.GELU / Op.SILU.

  gelu exact:  0.5 * x * (1 + erf(x / sqrt(2)))          (or x * 0.7071...; any association)
  gelu tanh:   0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   (GPT-2 NewGELU)
               0.5 * x * (1 + tanh(x * 0.79788 * (1 + 0.044715 * x * x))) (FastGELU)
  silu:        x * sigmoid(x),  x / (1 + exp(-x))
"""
from __future__ import annotations

import math
import time

from ..compiler.ir import Graph, Node
from ..compiler.ops import GeluAttrs, Op
from .pattern import Match, erf, exp, sigmoid, tanh, trace
from .rewrite import Rule, rewrite
from .report import PassReport

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)

GELU_ERF = trace(lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))))
GELU_TANH = trace(lambda x: 0.5 * x * (1 + tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))))
GELU_FAST = trace(lambda x: 0.5 * x * (1 + tanh(x * SQRT_2_OVER_PI * (1 + 0.044715 * x * x))))
SILU = trace(lambda x: x * sigmoid(x))
SILU_EXP = trace(lambda x: x / (1 + exp(-x)))


def _make(op: Op, attrs=None):
    def fn(m: Match) -> Node | None:
        x = m["x"]
        if not x.dtype.is_float or tuple(x.shape) != tuple(m.root.shape):
            return None
        return m.make(op, [x], attrs)
    fn.__name__ = op.name.lower()
    return fn


# Not exclusive: the interior is cheap elementwise math, and after CSE two activations of
# the same x share pieces such as 0.5 * x; a piece something else still reads just stays.
RULES = [
    Rule("gelu", GELU_ERF, _make(Op.GELU, GeluAttrs(False)), exclusive=False),
    Rule("gelu_tanh", GELU_TANH, _make(Op.GELU, GeluAttrs(True)), exclusive=False),
    Rule("gelu_tanh", GELU_FAST, _make(Op.GELU, GeluAttrs(True)), exclusive=False),
    Rule("silu", SILU, _make(Op.SILU), exclusive=False),
    Rule("silu", SILU_EXP, _make(Op.SILU), exclusive=False),
]


def fuse_activations(graph: Graph) -> tuple[Graph, PassReport]:
    t0 = time.perf_counter()
    graph, counts = rewrite(graph, RULES)
    left = sum(1 for n in graph.nodes() if n.op in (Op.ERF, Op.TANH, Op.SIGMOID))
    gelu = counts["gelu"] + counts["gelu_tanh"]
    lines = [f"gelu: {gelu} fused ({counts['gelu_tanh']} tanh)", f"silu: {counts['silu']} fused",
             f"erf/tanh/sigmoid left: {left}"]
    return graph, PassReport("fuse_activations", {"gelu_fused": gelu, "silu_fused": counts["silu"],
                                                  "activation_left": left}, lines, time.perf_counter() - t0)
