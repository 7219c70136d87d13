"""Attention spelled out -> Op.ATTENTION, then GQA and causal forms of every ATTENTION.

  softmax:   exp(x - max(x)) / sum(exp(x - max(x)))            -> SOFTMAX (any spelling below)
  attention: matmul(cast?(softmax(cast?(logits))), v) where
             logits = matmul(q [*c], k^T [*c]) (* scale | / sqrt(d)) [+ additive mask]
                      [where(mask, ., -inf) | where(~mask, -inf, .)]  (rank 4, or rank 3 [B*H, S, D])
  gqa:       ATTENTION whose k and v repeat kv heads (HF repeat_kv expand+reshape, an expand of a
             single head, or a take with a repeat-interleave index) -> ATTENTION on the unrepeated k/v
  causal:    ATTENTION whose mask is a pure function of shapes and equals the causal mask (or lets
             everything through) -> causal=True with the mask input dropped
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..compiler.dtypes import DType
from ..compiler.ir import Graph, Node
from ..compiler.ops import (AttentionAttrs, ConstAttrs, Op, PermuteAttrs, ShapeAttrs)
from ..compiler.symbolic import evaluate
from .consteval import evaluate_node, is_shape_only, sample_envs, symbols_of
from .pattern import Alt, Const, Match, OptCast, P, Prod, Var, last_axis, reciprocal
from .rewrite import Rule, rewrite
from .report import PassReport

NEG_LARGE = -1e4  # fill values at or below this mask a score out (exp underflows to 0)
ABSORBING_FILL = -1e30  # score + this == this in f32 for |score| < 3e22, and finite even scaled by 1e8


# ---- softmax -------------------------------------------------------------------------
def _keep_last(n: Node) -> bool:
    return last_axis(n) and n.attrs.keepdims


_E = P(Op.EXP, Alt(P(Op.SUB, Var("x"), P(Op.MAX, Var("x"), pred=_keep_last)), Var("x")), name="e")
_SUM = P(Op.SUM, Var("e"), pred=_keep_last)
SOFTMAX = Alt(P(Op.DIV, _E, _SUM), Prod(_E, reciprocal(_SUM)))


def _softmax(m: Match) -> Node | None:
    from ..compiler.ops import AxisAttrs

    x = m["x"]
    if not x.dtype.is_float or x.type.rank < 1:
        return None
    return m.make(Op.SOFTMAX, [x], AxisAttrs(x.type.rank - 1))


# ---- explicit attention ----------------------------------------------------------------
def _peel_scale(n: Node, m: Match) -> tuple[Node, float, list[Node]]:
    """n = base * scale through products/divisions by scalar constants (and float casts)."""
    scale, inner = 1.0, []
    while True:
        if n.op in (Op.MUL, Op.DIV):
            a, b = n.inputs
            cb = m.scalar(b)
            if cb is not None and cb != 0 and tuple(a.shape) == tuple(n.shape):
                scale, n = (scale * cb if n.op is Op.MUL else scale / cb), (inner.append(n) or a)
                continue
            ca = m.scalar(a) if n.op is Op.MUL else None
            if ca is not None and tuple(b.shape) == tuple(n.shape):
                scale, n = scale * ca, (inner.append(n) or b)
                continue
        if n.op is Op.CAST and n.dtype.is_float and n.inputs[0].dtype.is_float:
            inner.append(n)
            n = n.inputs[0]
            continue
        return n, scale, inner


def _absorbs(fill: float, dtype: DType) -> bool:
    """A finite fill so large that score + fill == fill in f32 for any |score| < 3e22.

    where(mask, s, fill) with a finite fill (torch.finfo.min) differs from a boolean mask in
    a row that is masked everywhere: softmax of equal fills is uniform (the mean of v), while
    ATTENTION's boolean mask gives 0 there (the -inf spelling's guarded result). DeBERTa masks
    padded query rows like that. Such a fill becomes an additive mask, where(mask, 0,
    ABSORBING_FILL): exact, since s + ABSORBING_FILL rounds to it. Other finite fills keep the
    boolean mask (exact in every row that keeps at least one key). The additive mask holds ABSORBING_FILL, not the
    fill itself: finfo.min would overflow to -inf where a backend rescales the mask (the CUDA
    kernel adds mask / scale to the unscaled scores) and bring back the all -inf row."""
    return dtype is DType.F32 and math.isfinite(fill) and fill <= ABSORBING_FILL


def _decompose(n: Node, m: Match, depth: int = 0):
    """logits -> (q, k^T, scale, [(kind, mask, factor)], interior nodes) or None."""
    if depth > 4:
        return None
    base, s, inner = _peel_scale(n, m)
    if base.op is Op.MATMUL:  # q/k scales are peeled but not claimed: cheap to redo if shared
        q, sq, _ = _peel_scale(base.inputs[0], m)
        kt, sk, _ = _peel_scale(base.inputs[1], m)
        return q, kt, s * sq * sk, [], inner + [base]
    if base.op is Op.ADD:
        for a, b in (base.inputs, base.inputs[::-1]):
            if not b.dtype.is_float:
                continue
            r = _decompose(a, m, depth + 1)
            if r is not None:
                q, kt, sc, masks, interior = r
                masks = [(k, mk, f * s) for k, mk, f in masks] + [("add", b, s)]
                return q, kt, sc * s, masks, inner + [base] + interior
    if base.op is Op.WHERE:
        c, a, b = base.inputs
        for scores, fill, keep in ((a, b, True), (b, a, False)):
            v = m.scalar(fill)
            if v is None or v > NEG_LARGE:
                continue
            r = _decompose(scores, m, depth + 1)
            if r is not None:
                q, kt, sc, masks, interior = r
                kind = ("fill", keep, v) if _absorbs(v, base.dtype) else ("bool" if keep else "not")
                masks = [(k, mk, f * s) for k, mk, f in masks] + [(kind, c, s)]
                return q, kt, sc * s, masks, inner + [base] + interior
    return None


def _reshape(m: Match, x: Node, shape) -> Node:
    shape = tuple(shape)
    while x.op is Op.RESHAPE:
        x = x.inputs[0]
    return x if tuple(x.shape) == shape else m.make(Op.RESHAPE, [x], ShapeAttrs(shape))


def _keys(kt: Node, m: Match) -> tuple[Node, float]:
    """k (new graph) and a scalar factor from the k^T operand. Sees through scalar scales and
    reshapes that only regroup leading axes (ONNX exports transpose k as [B*H, D, T])."""
    x, scale, regrouped = kt, 1.0, False
    while True:
        x, s, _ = _peel_scale(x, m)
        scale *= s
        if x.op is Op.RESHAPE and x.type.rank >= 2 and tuple(x.inputs[0].shape[-2:]) == tuple(x.shape[-2:]):
            x, regrouped = x.inputs[0], True
            continue
        break
    r = x.type.rank
    swap = tuple(range(r - 2)) + (r - 1, r - 2)
    if x.op is Op.PERMUTE:
        base, s, _ = _peel_scale(x.inputs[0], m)
        scale *= s
        perm = tuple(x.attrs.perm[i] for i in swap)
        src = m.new(base)
        k = src if perm == tuple(range(r)) else m.make(Op.PERMUTE, [src], PermuteAttrs(perm))
    else:
        k = m.make(Op.PERMUTE, [m.new(x)], PermuteAttrs(swap))
    if regrouped:  # transposing the last two axes commutes with regrouping the leading ones
        k = _reshape(m, k, tuple(kt.shape[:-2]) + (kt.shape[-1], kt.shape[-2]))
    return k, scale


def _combine_masks(masks, m: Match, dtype) -> Node | None:
    out: list[Node] = []
    kinds = {k for k, _, _ in masks}
    additive = any(k == "add" or isinstance(k, tuple) for k in kinds)
    for kind, mk, factor in masks:
        node = m.new(mk)
        if isinstance(kind, tuple):  # ("fill", keep, value): where(mask, 0, value) added to the scores
            _, keep, _fill = kind
            if factor != 1.0:  # a scale after the fill: not this spelling
                return None
            zero, big = (m.make(Op.CONST, [], ConstAttrs(x, dtype)) for x in (0.0, ABSORBING_FILL))
            out.append(m.make(Op.WHERE, [node, zero, big] if keep else [node, big, zero]))
            continue
        if kind == "not":
            node = m.new(mk.inputs[0]) if mk.op is Op.NOT else m.make(Op.NOT, [node])
        if kind == "add" and factor != 1.0:
            if factor <= 0:
                return None
            node = m.make(Op.MUL, [node, m.make(Op.CONST, [], ConstAttrs(factor, node.dtype))])
        if kind != "add" and additive:  # mixed kinds: everything additive
            zero = m.make(Op.CONST, [], ConstAttrs(0.0, dtype))
            ninf = m.make(Op.CONST, [], ConstAttrs(-math.inf, dtype))
            node = m.make(Op.WHERE, [node, zero, ninf])
        out.append(node)
    acc = out[0]
    for o in out[1:]:
        acc = m.make(Op.ADD if acc.dtype.is_float else Op.AND, [acc, o])
    return acc


_SM = P(Op.SOFTMAX, Var("logits"), pred=last_axis, name="softmax")
# where(isnan(p), 0, p): exporters guard fully masked rows; ATTENTION already gives 0 there
_GUARDED = P(Op.WHERE, P(Op.NE, _SM, _SM), Const(0.0), _SM)
PV = P(Op.MATMUL, OptCast(Alt(_GUARDED, _SM)), Var("v"))


def _attention(m: Match) -> Node | None:
    if m["v"].dtype is DType.F64:  # the ATTENTION kernel computes in f32; f64 stays spelled out
        return None
    r = _decompose(m.old("logits"), m)
    if r is None:
        return None
    q_old, kt_old, scale, masks, interior = r
    m.claim(*interior)
    v = m["v"]
    q = m.new(q_old)
    k, k_scale = _keys(kt_old, m)
    scale *= k_scale
    rank = q.type.rank
    if rank not in (3, 4) or k.type.rank != rank or v.type.rank != rank:
        return None
    if rank == 3:  # [B*H, S, D]: a batch of B*H single-head attentions
        q, k, v = (m.make(Op.RESHAPE, [t], ShapeAttrs((t.shape[0], 1) + tuple(t.shape[1:]))) for t in (q, k, v))
    if not (q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1] and k.shape[2] == v.shape[2]):
        return None
    hq, hk = q.shape[1], k.shape[1]
    if not (isinstance(hq, int) and isinstance(hk, int) and hk and hq % hk == 0) or q.shape[3] != k.shape[3]:
        return None
    operands = [q, k, v]
    if masks:
        mask = _combine_masks(masks, m, q.dtype)
        if mask is None:
            return None
        if rank == 3 and mask.type.rank == 4:
            return None
        if rank == 3 and mask.type.rank == 3:
            mask = m.make(Op.RESHAPE, [mask], ShapeAttrs((mask.shape[0], 1) + tuple(mask.shape[1:])))
        operands.append(mask)
    try:
        out = m.make(Op.ATTENTION, operands, AttentionAttrs(float(scale), False, bool(masks)))
    except Exception:
        return None
    if rank == 3:
        out = m.make(Op.RESHAPE, [out], ShapeAttrs((out.shape[0],) + tuple(out.shape[2:])))
    return out


# ---- GQA: unrepeated k/v ----------------------------------------------------------------
def _unrepeat(x: Node, m: Match) -> Node | None:
    """The [B, Hk, T, D] tensor whose kv heads `x` ([B, H, T, D]) repeats (each head R times
    in a row, as HF repeat_kv and repeat_interleave do), or None."""
    if x.type.rank != 4:
        return None
    b, h, t, d = x.shape
    if x.op is Op.RESHAPE and x.inputs[0].op is Op.EXPAND:
        e = x.inputs[0]
        y = e.inputs[0]
        if e.type.rank == 5 and y.type.rank == 5 and y.shape[2] == 1:
            b_, hk, r, t_, d_ = e.shape
            if (b_, t_, d_) == (b, t, d) and isinstance(hk, int) and isinstance(r, int) and hk * r == h \
                    and (y.shape[1], y.shape[3], y.shape[4]) == (hk, t, d) and y.shape[0] == b:
                if y.op is Op.RESHAPE and tuple(y.inputs[0].shape) == (b, hk, t, d):
                    return m.new(y.inputs[0])
                return m.make(Op.RESHAPE, [m.new(y)], ShapeAttrs((b, hk, t, d)))
    if x.op is Op.EXPAND:
        y = x.inputs[0]
        if y.type.rank == 4 and y.shape[1] == 1 and (y.shape[0], y.shape[2], y.shape[3]) == (b, t, d):
            return m.new(y)
    if x.op is Op.TAKE and x.attrs.axis == 1 and is_shape_only(x.inputs[1]) and x.inputs[1].type.rank == 1:
        y, idx = x.inputs
        if not isinstance(y.shape[1], int) or not isinstance(h, int) or y.shape[1] == 0 or h % y.shape[1]:
            return None
        val = evaluate_node(idx, {}, m.params) if not symbols_of([idx]) else None
        if val is not None and np.array_equal(val, np.repeat(np.arange(y.shape[1]), h // y.shape[1])):
            return m.new(y)
    return None


def _gqa(m: Match) -> Node | None:
    att = m.root
    k, v = _unrepeat(att.inputs[1], m), _unrepeat(att.inputs[2], m)
    if k is None or v is None or k.shape[1] != v.shape[1]:
        return None
    rest = [m.new(i) for i in att.inputs[3:]]
    return m.make(Op.ATTENTION, [m.new(att.inputs[0]), k, v, *rest], att.attrs)


# ---- causal masks -----------------------------------------------------------------------
def mask_kind(mask: Node, q: Node, k: Node, graph: Graph) -> str | None:
    """'causal' if the mask equals the bottom-right causal mask at every sampled size, 'none'
    if it never masks anything, None if it reads an input or is anything else."""
    if not is_shape_only(mask):
        return None
    names = symbols_of([mask, q, k]) | symbols_of(_all(mask))
    kinds = {"causal", "none"}
    checked = 0
    for env in sample_envs(names, graph.symbols):
        val = evaluate_node(mask, env, graph.params)
        if val is None:
            continue
        s, t = evaluate(q.shape[2], env), evaluate(k.shape[2], env)
        if val.ndim < 2:
            val = val.reshape((1,) * (2 - val.ndim) + val.shape)
        try:
            val = np.broadcast_to(val, val.shape[:-2] + (s, t))
        except ValueError:
            return None
        keep = np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s)
        allowed = val if val.dtype == np.bool_ else (val == 0)
        blocked = ~val if val.dtype == np.bool_ else (val <= NEG_LARGE)
        if not np.all(allowed | blocked):
            return None
        if "causal" in kinds and not np.array_equal(allowed, np.broadcast_to(keep, allowed.shape)):
            kinds.discard("causal")
        if "none" in kinds and not allowed.all():
            kinds.discard("none")
        if not kinds:
            return None
        checked += 1
    if checked < (2 if names else 1):  # static shapes: the one evaluation is exact
        return None
    return "none" if "none" in kinds else "causal"


def _all(n: Node) -> list[Node]:
    from .consteval import ancestors

    return ancestors(n)


def _causal(cache: dict):
    def fn(m: Match) -> Node | None:
        att = m.root
        if not att.attrs.has_mask:
            return None
        mask = att.inputs[3]
        key = (mask.uid, att.inputs[0].shape[2], att.inputs[1].shape[2])
        if key not in cache:
            cache[key] = mask_kind(mask, att.inputs[0], att.inputs[1], m.graph)
        kind = cache[key]
        if kind is None:
            return None
        causal = att.attrs.causal or kind == "causal"
        return m.make(Op.ATTENTION, [m.new(i) for i in att.inputs[:3]],
                      AttentionAttrs(att.attrs.scale, causal, False))
    fn.__name__ = "causal"
    return fn


def fuse_attention(graph: Graph) -> tuple[Graph, PassReport]:
    t0 = time.perf_counter()
    before = sum(1 for n in graph.nodes() if n.op is Op.ATTENTION)
    rules = [
        Rule("softmax", SOFTMAX, _softmax),
        Rule("attention", PV, _attention),
        Rule("gqa", P(Op.ATTENTION, any_inputs=True), _gqa, exclusive=False),
        Rule("causal", P(Op.ATTENTION, any_inputs=True), _causal({}), exclusive=False),
    ]
    graph, counts = rewrite(graph, rules)
    atts = [n for n in graph.nodes() if n.op is Op.ATTENTION]
    fused = len(atts) - before
    left = sum(1 for n in graph.nodes() if n.op is Op.SOFTMAX)
    gqa = sum(1 for a in atts if a.inputs[1].shape[1] != a.inputs[0].shape[1])
    causal = sum(1 for a in atts if a.attrs.causal)
    masked = sum(1 for a in atts if a.attrs.has_mask)
    lines = [f"attention: {fused} fused, {left} left", f"gqa: {gqa} of {len(atts)}",
             f"causal: {causal}, with mask input: {masked}"]
    if counts["softmax"]:
        lines.append(f"softmax spelled out: {counts['softmax']}")
    return graph, PassReport("fuse_attention", {"attention_fused": fused, "attention_left": left,
                                                "attention_total": len(atts), "gqa": gqa, "causal": causal,
                                                "masked": masked, "softmax_spelled": counts["softmax"]},
                             lines, time.perf_counter() - t0)
