"""The shard pass's per-op rules: given the layouts of an op's inputs, the rank-local op and the
layout of its result. Keyed by `Op`; an op without a rule (or a rule that declines, returning
None) runs replicated: its split inputs are gathered and partial ones reduced first, which is
always correct, only slower.

The Megatron cut falls out of two matmul rules: a matmul by a weight whose input is replicated
splits the weight's columns (its output is split); one whose input is split along the
contraction splits the weight's rows (its output is a partial sum, reduced where a replicated
value is needed, i.e. at the residual add). Between the two, elementwise ops, reshapes into heads,
slices of merged projections and attention keep the split.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..compiler import ir
from ..compiler.ir import Node
from ..compiler.ops import CastAttrs, ELEMENTWISE, Op, ShapeAttrs, SliceAttrs
from .shard_layout import PARTIAL, Sharder, Split, const

Rule = Callable[[Sharder, Node], "tuple[Node, object] | None"]


def _cut_points(sh: Sharder, n: Node, axis: int, depth: int = 0) -> set[int] | None:
    """Where n's users cut `axis` with slices (looking through same-shape elementwise ops, e.g. a
    bias add); None when some user reads the axis whole."""
    pts: set[int] = set()
    for u in sh.users.get(n.uid, []):
        if u.op is Op.SLICE and u.attrs.axis == axis and u.attrs.step == 1 and \
                isinstance(u.attrs.start, int) and isinstance(u.attrs.end, int):
            pts |= {u.attrs.start, min(u.attrs.end, n.shape[axis])}
        elif depth < 4 and (u.op in ELEMENTWISE and u.shape == n.shape or
                            u.op is Op.RESHAPE and axis == n.type.rank - 1 and u.shape[-1] == n.shape[-1]):
            sub = _cut_points(sh, u, u.type.rank - 1 if u.op is Op.RESHAPE else axis, depth + 1)
            if sub is None:
                return None
            pts |= sub
        else:
            return None
    return pts


def _segments(sh: Sharder, n: Node, axis: int) -> tuple[int, ...] | None:
    size = n.shape[axis]
    if not isinstance(size, int):
        return None
    pts = _cut_points(sh, n, axis) or set()
    bounds = sorted(pts | {0, size})
    segs = tuple(b - a for a, b in zip(bounds, bounds[1:]) if b > a)
    if all(s % sh.world == 0 for s in segs):
        return segs
    return (size,) if size % sh.world == 0 else None


def _weight_operand(sh: Sharder, w: Node):
    """(make, k_axis, n_axis) for a matmul's [K, N] operand that is a weight or a transposed one
    (a tied LM head reads the embedding table [N, K]): make(axis, segments) builds the rank's part."""
    if w.op is Op.WEIGHT and w.type.rank == 2:
        return (lambda axis, segs: sh.weight(w, axis, segs)), 0, 1
    if w.op is Op.PERMUTE and w.attrs.perm == (1, 0) and w.inputs[0].op is Op.WEIGHT:
        t = w.inputs[0]
        return (lambda axis, segs: ir.node(Op.PERMUTE, [sh.weight(t, axis, segs)], w.attrs, w.where)), 1, 0
    return None


def _matmul(sh: Sharder, n: Node):
    x, w = n.inputs
    operand = _weight_operand(sh, w)
    if operand is None:
        return None
    make, k_axis, n_axis = operand
    lx = sh.layout(x)
    last = n.type.rank - 1
    if lx is None:  # column-parallel: each rank makes some of the output features
        segs = _segments(sh, n, last)
        if segs is None:
            return None
        sh.count("column_parallel")
        return ir.node(Op.MATMUL, [sh.node(x), make(n_axis, segs)], n.attrs, n.where), Split(last, segs)
    if isinstance(lx, Split) and lx.axis == x.type.rank - 1:  # row-parallel: a partial sum of the output
        sh.count("row_parallel")
        return ir.node(Op.MATMUL, [sh.node(x), make(k_axis, lx.segments)], n.attrs, n.where), PARTIAL
    return None


def _qmatmul(sh: Sharder, n: Node):
    """A weight-only quantized matmul (compiler/quant_layout.py) splits like a matmul: its packed
    weight, scales and zeros are [N, .] row-major by output channel, so columns split on axis 0;
    rows split on axis 1, whole groups per rank (a per-channel scale, group = K, is kept whole and
    each rank's group becomes its K)."""
    x, qw, scales, *zeros = n.inputs
    act = zeros if n.attrs.act_bits else []  # W8A8: the 4th input is x's row scales, not a weight
    zeros = [] if n.attrs.act_bits else zeros
    if any(w.op is not Op.WEIGHT for w in (qw, scales, *zeros)):
        return None
    at, lx, last = n.attrs, sh.layout(x), n.type.rank - 1
    if lx is None and all(sh.layout(a) is None for a in act):
        segs = _segments(sh, n, last)
        if segs is None:
            return None
        sh.count("column_parallel")
        ins = [sh.node(x)] + [sh.weight(w, 0, segs) for w in (qw, scales, *zeros)] + [sh.node(a) for a in act]
        return ir.node(Op.QMATMUL, ins, at, n.where), Split(last, segs)
    if not (isinstance(lx, Split) and lx.axis == x.type.rank - 1 and len(lx.segments) == 1):
        return None
    if at.act_bits:  # a row's int8 scale is its max over the whole K: a K slice would scale it otherwise
        return None
    k = lx.segments[0]
    kl = k // sh.world
    if at.bits == 4 and kl % 2:
        return None
    packed = (k // 2,) if at.bits == 4 else (k,)
    if at.group == k:  # one scale per output channel: the same on every rank
        group, grouped = kl, [sh.node(w) for w in (scales, *zeros)]
    elif kl % at.group == 0:
        group, grouped = at.group, [sh.weight(w, 1, (k // at.group,)) for w in (scales, *zeros)]
    else:
        return None
    sh.count("row_parallel")
    ins = [sh.node(x), sh.weight(qw, 1, packed), *grouped]
    return ir.node(Op.QMATMUL, ins, dataclasses.replace(at, group=group), n.where), PARTIAL


def _elementwise(sh: Sharder, n: Node):
    lays = [sh.layout(i) for i in n.inputs]
    if any(lay is PARTIAL for lay in lays):
        # a sum of partial sums is a partial sum; anything else needs the whole value
        if n.op in (Op.ADD, Op.SUB) and all(lay is PARTIAL for lay in lays):
            return ir.node(n.op, [sh.node(i) for i in n.inputs], n.attrs, n.where), PARTIAL
        return None
    rank = n.type.rank
    splits = {(lay.axis + rank - i.type.rank, lay.segments) for i, lay in zip(n.inputs, lays) if isinstance(lay, Split)}
    if len(splits) != 1:
        return None
    ((axis, segs),) = splits
    ins = []
    for i, lay in zip(n.inputs, lays):
        a = axis - (rank - i.type.rank)  # the split axis in this operand (broadcast from the right)
        if isinstance(lay, Split) or a < 0 or i.shape[a] == 1:
            ins.append(sh.node(i))
        elif i.op is Op.WEIGHT:  # a bias or scale along the split features: split it alike
            ins.append(sh.weight(i, a, segs))
        else:
            return None
    return ir.node(n.op, ins, n.attrs, n.where), Split(axis, segs)


def _permute(sh: Sharder, n: Node):
    lay = sh.layout(n.inputs[0])
    if lay is PARTIAL:
        return ir.node(Op.PERMUTE, [sh.node(n.inputs[0])], n.attrs, n.where), PARTIAL
    if isinstance(lay, Split):
        return ir.node(Op.PERMUTE, [sh.node(n.inputs[0])], n.attrs, n.where), \
            Split(n.attrs.perm.index(lay.axis), lay.segments)
    return None


def _dim_groups(ins: list, outs: list) -> list[tuple[list[int], list[int]]] | None:
    """Pair the dims of a reshape into groups of equal product ([4, 8] -> [32], [32] -> [4, 8], a
    size-1 dim alone); symbolic dims only pair with themselves. None when they do not line up."""
    groups, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        if i < len(ins) and ins[i] == 1 and (j >= len(outs) or outs[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(outs) and outs[j] == 1 and (i >= len(ins) or ins[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(ins) or j >= len(outs):
            return None
        if ins[i] == outs[j]:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        gi, gj, pi, pj = [i], [j], ins[i], outs[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if not isinstance(pi, int) or not isinstance(pj, int):
                return None
            if pi < pj and i < len(ins) and isinstance(ins[i], int):
                pi, i = pi * ins[i], i + 1
                gi.append(i - 1)
            elif pj < pi and j < len(outs) and isinstance(outs[j], int):
                pj, j = pj * outs[j], j + 1
                gj.append(j - 1)
            else:
                return None
        groups.append((gi, gj))
    return groups


def _reshape(sh: Sharder, n: Node):
    x = n.inputs[0]
    lay = sh.layout(x)
    if lay is PARTIAL:
        return ir.node(Op.RESHAPE, [sh.node(x)], n.attrs, n.where), PARTIAL
    if not isinstance(lay, Split):
        return None
    outs = list(n.attrs.shape)
    groups = _dim_groups(list(x.shape), outs)
    if groups is None:
        return None
    gi, gj = next(g for g in groups if lay.axis in g[0])
    if len(gi) == 1 and len(gj) == 1:  # the axis itself, moved
        axis, segs = gj[0], lay.segments
    elif gi[0] == lay.axis and gj and len(lay.segments) == 1 and isinstance(outs[gj[0]], int) and \
            (len(gj) == 1 or outs[gj[0]] % sh.world == 0):
        # the split axis is the outermost of its group: it opens into heads (split the first) or
        # folds the heads into features (split the whole), either way contiguous per rank
        axis, segs = gj[0], (outs[gj[0]],)
    else:
        return None
    local = list(outs)
    local[axis] = outs[axis] // sh.world
    return ir.node(Op.RESHAPE, [sh.node(x)], ShapeAttrs(tuple(local)), n.where), Split(axis, segs)


def _slice(sh: Sharder, n: Node):
    x = n.inputs[0]
    lay = sh.layout(x)
    if not isinstance(lay, Split):
        return None
    at = n.attrs
    if at.axis != lay.axis:
        return ir.node(Op.SLICE, [sh.node(x)], at, n.where), lay
    bounds = np.cumsum((0,) + lay.segments).tolist()
    local = np.cumsum((0,) + lay.local(sh.world)).tolist()
    last = len(lay.segments) - 1
    for j in range(last + 1):
        ends = at.end == bounds[j + 1] or (j == last and isinstance(at.end, int) and at.end >= bounds[-1])
        if at.step == 1 and at.start == bounds[j] and ends:
            return ir.node(Op.SLICE, [sh.node(x)], SliceAttrs(at.axis, local[j], local[j + 1]), n.where), \
                Split(lay.axis, (lay.segments[j],))
    return None


def _concat(sh: Sharder, n: Node):
    lays = [sh.layout(i) for i in n.inputs]
    if all(isinstance(lay, Split) for lay in lays) and len({(lay.axis, lay.segments) for lay in lays}) == 1 \
            and lays[0].axis != n.attrs.axis:
        return ir.node(Op.CONCAT, [sh.node(i) for i in n.inputs], n.attrs, n.where), lays[0]
    return None


def _take(sh: Sharder, n: Node):
    table, ids = n.inputs
    lt, li = sh.layout(table), sh.layout(ids)
    axis = n.attrs.axis
    if li is not None:
        return None
    if isinstance(lt, Split) and lt.axis != axis:  # rows picked from a split tensor stay split
        out_axis = lt.axis if lt.axis < axis else lt.axis - 1 + ids.type.rank
        return ir.node(Op.TAKE, [sh.node(table), sh.node(ids)], n.attrs, n.where), Split(out_axis, lt.segments)
    if table.op is Op.WEIGHT and table.type.rank == 2 and axis == 0 and lt is None:
        return _vocab_parallel_lookup(sh, n)
    return None


def _vocab_parallel_lookup(sh: Sharder, n: Node):
    """An embedding table split by rows (vocabulary): each rank looks up the ids it holds and
    zeros the others; the ranks' results sum to the lookup (a partial sum)."""
    table, ids = n.inputs
    vocab = table.shape[0]
    if not isinstance(vocab, int) or vocab % sh.world:
        return None
    rows = vocab // sh.world
    w = n.where
    start = sh.rank_constant(f"{table.attrs.name}#vocab_start", [np.array([r * rows]) for r in range(sh.world)],
                             ids.dtype)
    local_ids = ir.node(Op.SUB, [sh.node(ids), start], None, w)
    valid = ir.node(Op.AND, [ir.node(Op.GE, [local_ids, const(0, ids.dtype)], None, w),
                             ir.node(Op.LT, [local_ids, const(rows, ids.dtype)], None, w)], None, w)
    safe = ir.node(Op.WHERE, [valid, local_ids, const(0, ids.dtype)], None, w)
    looked = ir.node(Op.TAKE, [sh.weight(table, 0, (vocab,)), safe], n.attrs, w)
    keep = ir.node(Op.CAST, [ir.node(Op.RESHAPE, [valid], ShapeAttrs((*ids.shape, 1)), w)], CastAttrs(table.dtype), w)
    sh.count("vocab_parallel_embedding")
    return ir.node(Op.MUL, [looked, keep], None, w), PARTIAL


def _heads(sh: Sharder, n: Node, qkv: tuple[Node, ...]) -> bool:
    """q, k, v all split over their head axis (1) alone."""
    return all(isinstance(sh.layout(t), Split) and sh.layout(t).axis == 1 and len(sh.layout(t).segments) == 1
               for t in qkv)


def _paged_attention(sh: Sharder, n: Node):
    q, k, v, cache, *rest = n.inputs
    if not _heads(sh, n, (q, k, v)) or any(sh.layout(t) is not None for t in rest) or cache.op is not Op.INPUT:
        return None
    local_cache = sh.inputs.get(cache.uid)
    if local_cache is None:
        shape = list(cache.shape)
        shape[3] = shape[3] // sh.world  # [pages, 2, page, kv_heads, head_dim]: this rank's kv heads
        local_cache = ir.input_node(cache.attrs.name, ir.TensorType(tuple(shape), cache.dtype))
        sh.inputs[cache.uid] = local_cache
    sh.count("attention_by_heads")
    ins = [sh.node(q), sh.node(k), sh.node(v), local_cache, *[sh.node(t) for t in rest]]
    return ir.node(Op.PAGED_ATTENTION, ins, n.attrs, n.where), Split(1, (q.shape[1],))


def _attention(sh: Sharder, n: Node):
    q, k, v, *mask = n.inputs
    if not _heads(sh, n, (q, k, v)):
        return None
    if mask:
        m = mask[0]
        axis = 1 - (4 - m.type.rank)
        if sh.layout(m) is not None or (axis >= 0 and m.shape[axis] != 1):
            return None
    sh.count("attention_by_heads")
    return ir.node(Op.ATTENTION, [sh.node(t) for t in n.inputs], n.attrs, n.where), Split(1, (q.shape[1],))


RULES: dict[Op, Rule] = {
    Op.MATMUL: _matmul, Op.QMATMUL: _qmatmul,
    **{op: _elementwise for op in ELEMENTWISE},
    Op.PERMUTE: _permute, Op.RESHAPE: _reshape, Op.SLICE: _slice, Op.CONCAT: _concat, Op.TAKE: _take,
    Op.PAGED_ATTENTION: _paged_attention, Op.ATTENTION: _attention,
}

__all__ = ["RULES"]
