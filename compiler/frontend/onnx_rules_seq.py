"""ONNX sequence operators, resolved at import time.

A sequence is a python list of tensor values (`SeqVal`): building, splitting, indexing and
concatenating one only rearranges IR values, so no sequence type reaches the IR. Positions
must be known at import time (a position read from runtime data, or a sequence as a graph
input or output, is an UnsupportedOpError).
"""
from __future__ import annotations

from ...errors import LLMCError, UnsupportedOpError
from ..dtypes import DType
from ..ops import AxisAttrs, Op, SliceAttrs
from .onnx_context import NodeCtx, SeqVal, Val
from .onnx_rules import norm_axis, reshape, rule


def _position(x: NodeCtx, i: int, n: int, insert: bool = False) -> int:
    """A known position into a sequence of n items (negative counts from the end)."""
    if x.val(i).known is None:
        raise UnsupportedOpError(f"a sequence position read from runtime data ({x.proto.input[i]!r}) is not supported")
    p = x.int_scalar(i)
    hi = n if insert else n - 1
    if not -n <= p <= hi:
        raise LLMCError(f"position {p} is out of range for a sequence of {n}")
    return p + n if p < 0 else p


@rule("SequenceEmpty")
def _empty(x: NodeCtx):
    return SeqVal([])


@rule("SequenceConstruct")
def _construct(x: NodeCtx):
    vals = x.vals()
    if len({v.dtype for v in vals}) > 1:
        raise LLMCError("SequenceConstruct inputs differ in type")
    return SeqVal(vals)


@rule("SequenceInsert")
def _insert(x: NodeCtx):
    s, t = x.seq(0), x.val(1)
    items = list(s.items)
    items.insert(_position(x, 2, len(items), insert=True) if x.has(2) else len(items), t)
    return SeqVal(items)


@rule("SequenceErase")
def _erase(x: NodeCtx):
    items = list(x.seq(0).items)
    if not items:
        raise LLMCError("SequenceErase on an empty sequence")
    del items[_position(x, 1, len(items)) if x.has(1) else -1]
    return SeqVal(items)


@rule("SequenceAt")
def _at(x: NodeCtx):
    items = x.seq(0).items
    return items[_position(x, 1, len(items))]


@rule("SequenceLength")
def _length(x: NodeCtx):
    return x.const(len(x.seq(0).items), DType.I64)


@rule("ConcatFromSequence")
def _concat(x: NodeCtx):
    items = x.seq(0).items
    if not items:
        raise LLMCError("ConcatFromSequence of an empty sequence")
    axis = x.attr_int("axis")
    if axis is None:
        raise LLMCError("missing attribute 'axis'")
    new_axis = bool(x.attr_int("new_axis", 0))
    rank = items[0].rank + new_axis
    axis = norm_axis(axis, rank)
    if new_axis:
        items = [reshape(x, v, v.shape[:axis] + (1,) + v.shape[axis:]) for v in items]
    return items[0] if len(items) == 1 else x.apply(Op.CONCAT, items, AxisAttrs(axis))


@rule("SplitToSequence")
def _split(x: NodeCtx):
    v = x.val(0)
    axis = norm_axis(x.attr_int("axis", 0), v.rank)
    d = v.shape[axis]
    if not isinstance(d, int):
        raise UnsupportedOpError(f"SplitToSequence needs a static dim, axis {axis} is {d}")
    if x.has(1):
        split = x.known(1)
        if split.ndim == 0:
            k = int(split)
            if k < 1:
                raise LLMCError(f"split size {k} must be positive")
            sizes = [min(k, d - s) for s in range(0, d, k)]
        else:
            sizes = x.ints(1)
            if sum(sizes) != d or min(sizes, default=0) < 0:
                raise LLMCError(f"split sizes {sizes} do not add up to dim {d}")
        keep = True
    else:
        sizes, keep = [1] * d, bool(x.attr_int("keepdims", 1))
    out, start = [], 0
    for n in sizes:
        part: Val = x.apply(Op.SLICE, [v], SliceAttrs(axis, start, start + n))
        if not keep:
            part = reshape(x, part, v.shape[:axis] + v.shape[axis + 1:])
        out.append(part)
        start += n
    return SeqVal(out)
