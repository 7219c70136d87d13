"""TE lowering of the mixture-of-experts ops: TOPK and ROUTED_MATMUL.

TOPK ranks every element of a row against the row (a static, small axis: the experts), so
it needs no sort: rank[e] = #{j : x[j] comes before x[e]}, with ties to the lower index
and NaN first (a strict total order, so the ranks are a permutation and every output
index is in range whatever the input); out[r] = the e whose rank is r.

ROUTED_MATMUL computes out[*, n] = sum_c x[*, c] * w[id[*], n, c]: the loops of a row run
over its own expert's matrix only, addressed through the id the row loads. Ids are
wrapped (numpy's negative indices) and clamped to [0, E), so no id reads outside `w`.
"""
from __future__ import annotations

from typing import Sequence

from tvm import te, tirx

from llmc.compiler.ir import Node
from llmc.compiler.ops import Op

from .te_rules import (F32, I64, TE_RULES, LowerCtx, _compute, _raxis, c64, cast, compute_dtype, is_float,
                       wrap_index)


def _before(a_j, a_i, j, i, largest: bool, floating: bool) -> tirx.PrimExpr:
    """Does element j come before element i in top-k order?"""
    better = a_j > a_i if largest else a_j < a_i
    tie = tirx.all(a_j == a_i, j < i)
    if not floating:
        return tirx.any(better, tie)
    nan_j, nan_i = tirx.isnan(a_j), tirx.isnan(a_i)
    nan_first = tirx.all(nan_j, tirx.Not(nan_i)) if largest else tirx.all(nan_i, tirx.Not(nan_j))
    return tirx.any(nan_first, better, tie, tirx.all(nan_j, nan_i, j < i))


def _topk(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
    (x,) = ins
    ax, k, largest = node.attrs.axis, node.attrs.k, node.attrs.largest
    xshape = ctx.shape(node.inputs[0].shape)
    idt = str(x.dtype)
    cdt = compute_dtype(idt)
    floating = is_float(idt)
    n = xshape[ax]

    def val(idx):
        return cast(x(*idx), F32 if floating and idt != "float64" else cdt)

    j = _raxis(ctx, n, "j")

    def rank(*i):
        other = list(i)
        other[ax] = j.var
        hit = _before(val(other), val(i), j.var, i[ax], largest, floating)
        return te.sum(tirx.Select(hit, c64(1), c64(0)), axis=j)

    ranks = te.compute(xshape, rank, name=ctx.name("topk_rank"))
    e = _raxis(ctx, n, "e")

    def select(*o):
        src = list(o)
        src[ax] = e.var
        return te.sum(tirx.Select(ranks(*src) == o[ax], e.var, c64(0)), axis=e)

    return _compute(ctx, node, select, "topk_select")


def _routed_matmul(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
    x, w, ids = ins
    nk = node.attrs.weight_nk
    odt = node.dtype.value
    acc = F32 if is_float(odt) and odt != "float64" else ("float64" if odt == "float64" else I64)
    experts = ctx.dim(node.inputs[1].shape[0])
    kdim = ctx.dim(node.inputs[0].shape[-1])
    c = _raxis(ctx, kdim, "k")

    def expert(lead):
        return tirx.max(tirx.min(wrap_index(ids(*lead), experts), experts - c64(1)), c64(0))

    def f(*i):
        lead, col = i[:-1], i[-1]
        e = expert(lead)
        wv = w(e, col, c.var) if nk else w(e, c.var, col)
        return te.sum(cast(x(*lead, c.var), acc) * cast(wv, acc), axis=c)

    # Not named matmul_acc: the GEMM schedule packs one B panel shared by every row, but here
    # each row has its own B. The CPU scheduler's per-block strategy runs rows x N in
    # parallel with scalar dot products (vector lanes over K are left to a later schedule).
    out = _compute(ctx, node, f, "routed_matmul_acc")
    if acc == odt:
        return out
    return _compute(ctx, node, lambda *i: cast(out(*i), odt), "routed_matmul_out")


# te_rules imports this module on its last line; either import order registers the rules
TE_RULES.update({Op.TOPK: _topk, Op.ROUTED_MATMUL: _routed_matmul})
