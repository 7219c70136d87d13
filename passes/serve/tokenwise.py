"""check_tokenwise: does every op of a graph treat the token axis one token at a time?

A step function puts the tokens of many sequences on one axis; that is sound only where
no op but paged attention lets one token's values reach another's. The token axis is
recognised by its dim (the fresh symbols `tokens` / `rows` appear nowhere else), so the
check reads shapes: per op, the axes it reduces, contracts, slices or concatenates must
not be the token axis, and a reshape must keep the token axis whole (no folding tokens
into heads). The first op that breaks this is named in the LLMCError.
"""
from __future__ import annotations

from math import prod

from ...compiler.ir import Graph, Node
from ...compiler.ops import ELEMENTWISE, Op
from ...compiler.symbolic import Dim, SymExpr
from ...errors import LLMCError


def _has(d: Dim, syms: set[str]) -> bool:
    return isinstance(d, SymExpr) and bool(d.symbols & syms)


def _is(d: Dim, syms: set[str]) -> bool:
    return isinstance(d, SymExpr) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1 \
        and d.terms[0][0][0] in syms


def _token_axis(shape, syms) -> int | None:
    axes = [i for i, d in enumerate(shape) if _has(d, syms)]
    return axes[0] if axes else None


def _reshape_ok(x: Node, n: Node, syms: set[str]) -> bool:
    a, b = _token_axis(x.shape, syms), _token_axis(n.shape, syms)
    if a is None or b is None:
        return a is None and b is None
    before_a, before_b = x.shape[:a], n.shape[:b]
    static = all(isinstance(d, int) for d in (*before_a, *before_b))
    return static and prod(before_a) == prod(before_b) and x.shape[a] == n.shape[b]


def _axes_touched(n: Node) -> list[tuple[Node, int]]:
    """(operand, axis) pairs along which op n mixes elements."""
    op, a = n.op, n.attrs
    x = n.inputs[0] if n.inputs else None
    if op in (Op.SUM, Op.MEAN, Op.MAX, Op.MIN):
        return [(x, ax) for ax in a.axes]
    if op in (Op.SOFTMAX, Op.CUMSUM, Op.TOPK, Op.SLICE, Op.GATHER):
        return [(x, a.axis)]
    if op in (Op.LAYER_NORM, Op.RMS_NORM):
        return [(x, x.type.rank - 1)]
    if op is Op.CONCAT:
        return [(i, a.axis) for i in n.inputs]
    if op is Op.TAKE:
        return [(x, a.axis)]
    if op is Op.QTAKE:  # the table's rows (qweight, scales, zeros), never the ids
        return [(w, 0) for i, w in enumerate(n.inputs) if i != 1]
    if op is Op.INDEX:
        return [(x, ax) for ax in range(len(n.inputs) - 1)]
    if op in (Op.MATMUL, Op.ROUTED_MATMUL, Op.QMATMUL):
        # the weight operands (qweight, scales, zeros of a quantized one) are contracted whole;
        # a routed matmul's ids (third input) are per token, as are W8A8 / FP8's row scales
        # (a QMATMUL's 4th input when it quantizes activations: one per row of x)
        weights = n.inputs[1:2] if op is not Op.QMATMUL else n.inputs[1:3] if a.act_bits else n.inputs[1:]
        return [(x, x.type.rank - 1)] + [(w, ax) for w in weights for ax in range(w.type.rank)]
    return []


def check_tokenwise(graph: Graph, token_syms: set[str], allowed: frozenset[int] = frozenset()) -> None:
    """Raise LLMCError at the first node that mixes tokens. `allowed`: node uids exempt
    (the step function's own row gather)."""
    for n in graph.nodes():
        if n.op in (Op.INPUT, Op.WEIGHT, Op.CONST, Op.PAGED_ATTENTION) or n.uid in allowed:
            continue
        where = f"{n.op.name.lower()} at {n.where or '<graph>'}"
        bad = [d for d in n.shape if _has(d, token_syms) and not _is(d, token_syms)]
        if bad:
            raise LLMCError(f"cannot derive a step function: {where} folds the token axis into dim {bad[0]} "
                            f"(an op across the sequence?)")
        if n.op is Op.ATTENTION:
            raise LLMCError(f"cannot derive a step function: {where} is left as full-sequence attention")
        if n.op is Op.RESHAPE and not _reshape_ok(n.inputs[0], n, token_syms):
            raise LLMCError(f"cannot derive a step function: {where} reshapes {n.inputs[0].type} -> {n.type}, "
                            f"which does not keep the token axis whole")
        if n.op in ELEMENTWISE or n.op in (Op.PERMUTE, Op.EXPAND, Op.RESHAPE, Op.FULL, Op.ARANGE):
            continue
        for operand, ax in _axes_touched(n):
            if _has(operand.shape[ax], token_syms):
                raise LLMCError(f"cannot derive a step function: {where} works across the token axis "
                                f"(axis {ax} of {operand.type}): tokens would see each other")


__all__ = ["check_tokenwise"]
