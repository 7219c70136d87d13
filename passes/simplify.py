"""Cleanups every later pass relies on: identity ops dropped, reshape/permute/cast chains
folded, scalar constants folded, PERMUTE(WEIGHT) turned into a pre-transposed weight (so a
MATMUL reads its weight [K, N] row-major), and common subexpressions merged.

Masks get two more rules. Comparisons that an ARANGE's range decides fold to constants
(HF builds `q_idx >= 0` into every padding mask), `x AND True` becomes `x` broadcast, and an
attention mask that is an EXPAND is read before it: a key-padding mask then stays
[B, 1, 1, T] and the attention broadcasts it over the rows instead of reading B*S*T bytes."""
from __future__ import annotations

import time

import numpy as np

from ..compiler import ir
from ..compiler.dtypes import DType
from ..compiler.ir import Graph, Node
from ..compiler.ops import ELEMENTWISE, CastAttrs, ConstAttrs, FullAttrs, Op, PermuteAttrs, ShapeAttrs
from ..compiler.reference import run_op
from .pattern import Const, Match, P, Var
from .rewrite import Rule, rewrite
from .report import PassReport

# Casts that lose nothing, so cast(cast(x, wide), t) == cast(x, t).
_WIDER = {
    DType.F16: {DType.F32}, DType.BF16: {DType.F32}, DType.I8: {DType.I32, DType.I64, DType.F32},
    DType.U8: {DType.I32, DType.I64, DType.F32}, DType.I32: {DType.I64}, DType.BOOL: {DType.U8, DType.I8, DType.I32, DType.I64},
}


def _identity(m: Match) -> Node | None:
    n, x = m.root, m.old("x")
    if n.type != x.type:
        return None
    if n.op is Op.PERMUTE and tuple(n.attrs.perm) != tuple(range(x.type.rank)):
        return None
    if n.op is Op.SLICE and not (n.attrs.start == 0 and n.attrs.step == 1):
        return None
    return m["x"]


def _reshape_chain(m: Match) -> Node:
    x = m["x"]
    return x if tuple(x.shape) == tuple(m.root.shape) else m.make(Op.RESHAPE, [x], ShapeAttrs(tuple(m.root.shape)))


def _permute_chain(m: Match) -> Node:
    inner, outer = m.old("inner").attrs.perm, m.root.attrs.perm
    perm = tuple(inner[p] for p in outer)
    x = m["x"]
    return x if perm == tuple(range(len(perm))) else m.make(Op.PERMUTE, [x], PermuteAttrs(perm))


def _expand_chain(m: Match) -> Node:
    return m.make(Op.EXPAND, [m["x"]], ShapeAttrs(tuple(m.root.shape)))


def _cast_chain(m: Match) -> Node | None:
    x, mid = m.old("x"), m.old("mid")
    if mid.dtype not in _WIDER.get(x.dtype, ()):
        return None
    return m["x"] if m.root.dtype is x.dtype else m.make(Op.CAST, [m["x"]], CastAttrs(m.root.dtype))


def _fold_scalar(m: Match) -> Node | None:
    n = m.root
    if n.op not in ELEMENTWISE or n.type.rank != 0 or not n.inputs:
        return None
    if not all(i.op is Op.CONST for i in n.inputs):
        return None
    vals = [np.array(i.attrs.value, dtype=i.dtype.numpy) for i in n.inputs]
    out = run_op(n.op, n.attrs, vals, {}, n.dtype)
    v = out.item()
    return ir.node(Op.CONST, [], ConstAttrs(v, n.dtype), n.where)


def _neutral(value: float):
    def fn(m: Match) -> Node | None:
        x = m.old("x")
        if x.type != m.root.type:
            return None
        return m["x"]
    fn.__name__ = f"neutral_{value}"
    return fn


# views that keep (a subset of) the values of their input: its bounds hold for them too
_VALUE_VIEWS = frozenset({Op.RESHAPE, Op.EXPAND, Op.PERMUTE, Op.SLICE})


def _lower_bound(n: Node) -> int | None:
    """A proven lower bound of every element of n (an ARANGE counting up), or None."""
    while n.op in _VALUE_VIEWS:
        n = n.inputs[0]
    if n.op is Op.ARANGE and n.attrs.step > 0 and isinstance(n.attrs.start, int):
        return n.attrs.start
    return None


# comparison -> its value for every x >= lo when the bound decides it (else None), given lo and c
_DECIDED = {
    Op.GE: lambda lo, c: True if lo >= c else None,
    Op.GT: lambda lo, c: True if lo > c else None,
    Op.LT: lambda lo, c: False if lo >= c else None,
    Op.LE: lambda lo, c: False if lo > c else None,
}


def _range_compare(m: Match) -> Node | None:
    lo = _lower_bound(m.old("x"))
    if lo is None:
        return None
    v = _DECIDED[m.root.op](lo, m.const("c"))
    if v is None:
        return None
    return m.make(Op.FULL, [], FullAttrs(tuple(m.root.shape), v, DType.BOOL))


def _and_true(m: Match) -> Node | None:
    n, x = m.root, m.old("x")
    if n.dtype is not DType.BOOL or x.dtype is not DType.BOOL:
        return None
    return m["x"] if tuple(x.shape) == tuple(n.shape) else m.make(Op.EXPAND, [m["x"]], ShapeAttrs(tuple(n.shape)))


def _mask_before_expand(m: Match) -> Node:
    q, k, v = (m[name] for name in ("q", "k", "v"))
    return m.make(Op.ATTENTION, [q, k, v, m["mask"]], m.root.attrs)


def _permute_weight(m: Match) -> Node | None:
    w = m.old("w")
    perm = m.root.attrs.perm
    if w.attrs.gemm_rows:  # laid out [N, K] for its GEMMs on purpose: folding would copy it back
        return None
    # A weight read elsewhere untransposed (tied embeddings) would be duplicated: keep it.
    if any(u.op is not Op.PERMUTE or u.attrs.perm != perm for u in m.users(w)):
        return None
    arr = np.ascontiguousarray(np.transpose(m.params[w.attrs.name], perm))
    return m.add_param(transposed_name(w.attrs.name, perm), arr)


def transposed_name(name: str, perm: tuple = (1, 0)) -> str:
    """The name of a weight's permuted copy: `<name>.T` for a transpose, and back to `<name>` for
    the transpose of a `<name>.T` (it is the original layout again): torch's `x.weight` [N, K],
    folded to `x.weight.T` [K, N] at capture, is `x.weight` again once passes/gemm_weight_layout.py
    stores it [N, K] for a GEMM, not `x.weight.T.T`."""
    if tuple(perm) == (1, 0):
        return name[:-2] if name.endswith(".T") else name + ".T"
    return name + ".perm" + "".join(map(str, perm))


x = Var("x")
RULES = [
    Rule("identity", P([Op.CAST, Op.RESHAPE, Op.EXPAND, Op.PERMUTE, Op.SLICE], x), _identity, exclusive=False),
    Rule("identity", P(Op.CONCAT, x), _identity, exclusive=False),
    Rule("fold_reshape", P(Op.RESHAPE, P(Op.RESHAPE, x)), _reshape_chain, exclusive=False),
    Rule("fold_permute", P(Op.PERMUTE, P(Op.PERMUTE, x, name="inner")), _permute_chain, exclusive=False),
    Rule("fold_expand", P(Op.EXPAND, P(Op.EXPAND, x)), _expand_chain, exclusive=False),
    Rule("fold_cast", P(Op.CAST, P(Op.CAST, x, name="mid")), _cast_chain, exclusive=False),
    Rule("permute_weight", P(Op.PERMUTE, P(Op.WEIGHT, name="w")), _permute_weight, exclusive=False),
    Rule("fold_constant", P(ELEMENTWISE, any_inputs=True), _fold_scalar, exclusive=False),
    Rule("neutral", P(Op.MUL, x, Const(1.0)), _neutral(1), exclusive=False),
    Rule("neutral", P(Op.DIV, x, Const(1.0)), _neutral(1), exclusive=False),
    Rule("neutral", P(Op.ADD, x, Const(0.0)), _neutral(0), exclusive=False),
    Rule("neutral", P(Op.SUB, x, Const(0.0)), _neutral(0), exclusive=False),
    Rule("range_compare", P(list(_DECIDED), x, Const(name="c")), _range_compare, exclusive=False),
    Rule("and_true", P(Op.AND, x, Const(1.0)), _and_true, exclusive=False),
    Rule("mask_before_expand", P(Op.ATTENTION, Var("q"), Var("k"), Var("v"), P(Op.EXPAND, Var("mask"))),
         _mask_before_expand, exclusive=False),
]


def _cse_key(n: Node) -> tuple | None:
    if n.op is Op.INPUT:
        return None
    attrs = n.attrs
    if n.op in (Op.CONST, Op.FULL):  # -0.0 == 0.0 and 1 == True: compare by repr too
        attrs = (attrs, repr(attrs.value))
    try:
        key = (n.op, attrs, n.type, tuple(i.uid for i in n.inputs))
        hash(key)
    except TypeError:
        return None
    return key


def cse(graph: Graph) -> tuple[Graph, int]:
    """Merge nodes with the same op, attrs and inputs."""
    seen: dict[tuple, Node] = {}
    new_of: dict[int, Node] = {}
    merged = 0
    for n in graph.nodes():
        ins = [new_of[i.uid] for i in n.inputs]
        r = n if all(a is b for a, b in zip(ins, n.inputs)) else ir.node(n.op, ins, n.attrs, n.where)
        key = _cse_key(r)
        if key is not None and key in seen:
            new_of[n.uid] = seen[key]
            merged += 1
            continue
        if key is not None:
            seen[key] = r
        new_of[n.uid] = r
    if not merged:
        return graph, 0
    return graph.with_outputs([new_of[o.uid] for o in graph.outputs]), merged


def simplify(graph: Graph) -> tuple[Graph, PassReport]:
    t0 = time.perf_counter()
    graph, merged = cse(graph)
    graph, counts = rewrite(graph, RULES)
    graph, merged2 = cse(graph)
    counts = {k: v for k, v in counts.items() if v}
    counts["cse"] = merged + merged2
    lines = [f"{k.replace('_', ' ')}: {v}" for k, v in counts.items() if v]
    return graph, PassReport("simplify", counts, lines, time.perf_counter() - t0)
