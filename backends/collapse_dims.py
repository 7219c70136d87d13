"""Collapse the shared leading dims of a row-wise kernel into one, for GPU lowering.

A GPU schedule fuses a kernel's loops into one index and splits it over threads; TVM then
recovers each dim's index by division. With symbolic dims ([batch, seq, 1536]) those are
integer divisions by runtime values, per element and per buffer access (MiniLM's exact
GELU on an H100: 25 us with one such kernel, 12.5 us once collapsed, for 25 MB). When
every tensor of a kernel has the same leading dims L (or is a scalar, or a row vector that
broadcasts over them), the kernel computes the same thing on [prod(L), last] views, and the
only division left is by the static last dim.

    flat = collapse_leading_dims(kernel)   # None when it does not apply
    flat.kernel                            # lower this one
    flat.views                             # per call argument: its view shape, or None

The artifact records the view shapes, and the runtime passes each buffer as that view (a
reshape of contiguous memory: no copy).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmc.compiler import ir
from llmc.compiler.ir import Node
from llmc.compiler.ops import ELEMENTWISE, Op, ShapeAttrs
from llmc.compiler.program import Kernel
from llmc.compiler.symbolic import SymExpr
from llmc.errors import LLMCError

# ops that act on each row independently (SLICE / CONCAT only along the last axis)
_ROW_OPS = ELEMENTWISE | {Op.CONST, Op.SLICE, Op.CONCAT}


@dataclass(frozen=True)
class Collapsed:
    kernel: Kernel
    views: tuple  # per call argument (params, then outputs): the view shape, or None


def _row_shape(n: Node, lead: tuple, rank: int) -> bool | None:
    """True: n is [*lead, last]; False: a scalar or a [last] row vector; None: neither."""
    shape = tuple(n.shape)
    if len(shape) == rank and shape[:-1] == lead:
        return True
    if len(shape) <= 1:
        return False
    return None


def collapse_leading_dims(kernel: Kernel) -> Collapsed | None:
    ranked = [n for n in (*kernel.params, *kernel.body) if len(n.shape) > 1]
    if not ranked or any(n.op not in _ROW_OPS for n in kernel.body):
        return None
    rank = len(ranked[0].shape)
    lead = tuple(ranked[0].shape[:-1])
    # nothing to gain with static leading dims (constant divisors) or a single leading dim
    if rank < 3 or not any(isinstance(d, SymExpr) for d in lead):
        return None
    if any(_row_shape(n, lead, rank) is None for n in (*kernel.params, *kernel.body)):
        return None
    if any(n.op in (Op.SLICE, Op.CONCAT) and n.attrs.axis != rank - 1 for n in kernel.body):
        return None
    rows = lead[0]
    for d in lead[1:]:
        rows = rows * d

    def flat_shape(n: Node) -> tuple:
        return (rows, n.shape[-1])

    new: dict[int, Node] = {}
    params = []
    for p in kernel.params:  # stand-ins: only their type is read by the lowering
        q = ir.node(Op.RESHAPE, [p], ShapeAttrs(flat_shape(p))) if len(p.shape) == rank else p
        new[p.uid] = q
        params.append(q)
    try:
        for n in kernel.body:
            if n.op is Op.CONST:
                new[n.uid] = n
                continue
            attrs = dataclasses.replace(n.attrs, axis=1) if n.op in (Op.SLICE, Op.CONCAT) else n.attrs
            new[n.uid] = ir.node(n.op, [new[i.uid] for i in n.inputs], attrs, n.where)
    except LLMCError:  # a broadcast that only the full rank explains: leave the kernel alone
        return None
    for n in kernel.body:
        if len(n.shape) == rank and tuple(new[n.uid].shape) != flat_shape(n):
            return None
    flat = Kernel(kernel.name, tuple(params), tuple(new[n.uid] for n in kernel.body),
                  tuple(new[o.uid] for o in kernel.outputs), kernel.symbols)
    views = tuple(flat_shape(n) if len(n.shape) == rank else None for n in (*kernel.params, *kernel.outputs))
    return Collapsed(flat, views)


__all__ = ["collapse_leading_dims", "Collapsed"]
