"""Index bounds read off the graph: which inputs index a table, and how long a symbol may get.

TVM's take/gather kernels do not check their indices: a token id past the vocabulary
reads memory outside the embedding table (garbage, or SIGSEGV), and GPT-2's positions,
`arange(seq)`, run off the end of its position table once `seq` exceeds it (NaN/inf).

- `input_index_checks(graph)`: for every TAKE / INDEX / GATHER whose indices are a graph
  input (through value-preserving ops and shifts by constants) and whose indexed axis has
  a static size, the range each value of that input must lie in. The runtime checks them
  before any kernel runs (manifest section `input_checks`).
- `bound_symbols_by_tables(graph)`: where indices come from `arange(<symbolic end>)` or
  from a slice `[..., :<symbolic end>]` of a constant table (BERT's position_ids buffer),
  and where any static axis is sliced up to a symbolic end, lower that symbol's upper
  bound so the indices stay inside the table. The runtime already refuses dims outside
  the symbol bounds, and a lower bound also shrinks the memory plan.

Negative indices are refused (lo >= 0), as torch's embedding does, even where numpy
would wrap them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..compiler.ir import Graph, Node
from ..compiler.ops import Op
from ..compiler.symbolic import SymDim, SymExpr
from ..errors import LLMCError
from .report import PassReport


@dataclass(frozen=True)
class IndexCheck:
    """Every value v of graph input `input` must satisfy lo <= v < hi."""

    input: str
    lo: int
    hi: int
    table: str  # what it indexes, e.g. "transformer.wte.weight (50257 rows)"


# ---- tracing indices back to their source ----------------------------------------------
# Ops whose output values are (a rearrangement or subset of) their first operand's values.
_SAME_VALUES = frozenset({Op.RESHAPE, Op.EXPAND, Op.PERMUTE, Op.SLICE})


@dataclass(frozen=True)
class _Trace:
    """index = sign * v + offset, for the values v of `source`; `slices` are the SLICE
    nodes passed on the way, innermost (nearest the source) last."""

    source: Node
    sign: int
    offset: int
    slices: tuple[Node, ...]


def _int_const(n: Node) -> int | None:
    """The value of a scalar CONST or a FULL of an integer dtype, else None."""
    if n.op in (Op.CONST, Op.FULL) and n.dtype.is_int and not isinstance(n.attrs.value, bool):
        return int(n.attrs.value)
    return None


def _trace(n: Node) -> _Trace | None:
    """Follow an index operand back through value-preserving ops and +/- constants."""
    sign, offset, slices = 1, 0, []
    while True:
        if not n.dtype.is_int:
            return None
        if n.op in (Op.INPUT, Op.ARANGE, Op.WEIGHT):
            return _Trace(n, sign, offset, tuple(slices))
        if n.op is Op.CAST and n.inputs[0].dtype.is_int:
            n = n.inputs[0]
        elif n.op in _SAME_VALUES:
            if n.op is Op.SLICE:
                slices.append(n)
            n = n.inputs[0]
        elif n.op is Op.NEG:
            sign, n = -sign, n.inputs[0]
        elif n.op in (Op.ADD, Op.SUB):
            a, b = n.inputs
            ca, cb = _int_const(a), _int_const(b)
            if cb is not None:  # a +/- c
                offset += sign * (cb if n.op is Op.ADD else -cb)
                n = a
            elif ca is not None:  # c + b, or c - b
                offset += sign * ca
                sign = -sign if n.op is Op.SUB else sign
                n = b
            else:
                return None
        else:
            return None


def _allowed(t: _Trace, size: int) -> tuple[int, int]:
    """The range [lo, hi) of source values v that keep sign * v + offset inside [0, size)."""
    if t.sign > 0:
        return -t.offset, size - t.offset
    return t.offset - size + 1, t.offset + 1


def _indexings(graph: Graph) -> Iterator[tuple[Node, Node, int, int]]:
    """(indexing node, index operand, indexed axis, static axis size) for every index
    operand of a TAKE / INDEX / GATHER whose indexed axis has a static size."""
    for n in graph.nodes():
        if n.op in (Op.TAKE, Op.GATHER):
            pairs = [(n.inputs[1], n.attrs.axis)]
        elif n.op is Op.QTAKE:  # rows of a quantized table, as TAKE along axis 0
            pairs = [(n.inputs[1], 0)]
        elif n.op is Op.INDEX:
            pairs = [(idx, axis) for axis, idx in enumerate(n.inputs[1:])]
        else:
            continue
        table = n.inputs[0]
        for idx, axis in pairs:
            size = table.shape[axis]
            if isinstance(size, int):
                yield n, idx, axis, size


def _table_name(n: Node) -> str:
    table = n.inputs[0]
    while table.op is Op.CAST:  # e.g. a weight stored in another dtype
        table = table.inputs[0]
    if table.op is Op.WEIGHT:
        return table.attrs.name
    return f"the {table.op.name.lower()} indexed by {n.op.name} at {n.where or '<graph>'}"


def _extent(axis: int, size: int) -> str:
    return f"{size} rows" if axis == 0 else f"{size} entries on axis {axis}"


def _describe_table(n: Node, axis: int, size: int) -> str:
    return f"{_table_name(n)} ({_extent(axis, size)})"


def input_index_checks(graph: Graph) -> tuple[IndexCheck, ...]:
    """The ranges graph inputs must lie in so every table lookup stays inside its table,
    one per input (several lookups of one input are intersected), in input order."""
    found: dict[str, IndexCheck] = {}
    for n, idx, axis, size in _indexings(graph):
        t = _trace(idx)
        if t is None or t.source.op is not Op.INPUT:
            continue
        lo, hi = _allowed(t, size)
        lo = max(lo, 0)  # negative ids are refused, not wrapped
        check = IndexCheck(t.source.attrs.name, lo, hi, _describe_table(n, axis, size))
        old = found.get(check.input)
        if old is not None:  # intersect, naming the table(s) each end comes from
            lo_from = old if old.lo >= check.lo else check
            hi_from = old if old.hi <= check.hi else check
            table = hi_from.table if lo_from.lo == hi_from.lo else f"{lo_from.table}; {hi_from.table}"
            check = IndexCheck(check.input, lo_from.lo, hi_from.hi, table)
        found[check.input] = check
    order = [i.attrs.name for i in graph.inputs]
    return tuple(sorted(found.values(), key=lambda c: order.index(c.input) if c.input in order else len(order)))


# ---- lowering symbol bounds ------------------------------------------------------------
def _linear_in_one(d) -> tuple[str, int, int] | None:
    """(symbol, c, k) when d == c * symbol + k with c > 0, else None."""
    if not isinstance(d, SymExpr) or len(d.symbols) != 1:
        return None
    (name,) = d.symbols
    c = k = 0
    for mono, coef in d.terms:
        if mono == ():
            k = coef
        elif mono == (name,):
            c = coef
        else:
            return None
    return (name, c, k) if c > 0 else None


def _longest_valid_prefix(values: np.ndarray, axis: int, start: int, lo: int, hi: int) -> int:
    """The largest e such that every value at positions [start, e) along `axis` is in [lo, hi)."""
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    ok = ((moved >= lo) & (moved < hi)).all(axis=1) if moved.shape[1] else np.ones(len(moved), bool)
    bad = np.flatnonzero(~ok[start:])
    return start + int(bad[0]) if bad.size else values.shape[axis]


def _end_limits(graph: Graph) -> Iterator[tuple[object, int, str]]:
    """(symbolic end expression, largest value it may take, why) for every limit the
    graph puts on a symbolic end: lookups of arange / constant-slice indices, and slices
    of static axes."""
    for n in graph.nodes():
        if n.op is Op.SLICE and isinstance(n.inputs[0].shape[n.attrs.axis], int):
            size, src = n.inputs[0].shape[n.attrs.axis], n.inputs[0]
            name = src.attrs.name if src.op is Op.WEIGHT else f"the {src.op.name.lower()} at {n.where or '<graph>'}"
            yield n.attrs.end, size, f"{name} is sliced up to it on axis {n.attrs.axis}, which is {size} long"
    for n, idx, axis, size in _indexings(graph):
        t = _trace(idx)
        if t is None:
            continue
        lo, hi = _allowed(t, size)
        table = _describe_table(n, axis, size)
        src = t.source
        if src.op is Op.ARANGE and src.attrs.step == 1:
            # values [start, end): end <= hi keeps the largest inside the table
            yield src.attrs.end, hi, f"{_table_name(n)} has {_extent(axis, size)}"
        elif src.op is Op.WEIGHT and t.slices and graph.params.get(src.attrs.name) is not None:
            sl = t.slices[-1]
            if sl.inputs[0] is src and isinstance(sl.attrs.start, int) and sl.attrs.step == 1:
                data = np.asarray(graph.params[src.attrs.name])
                e = _longest_valid_prefix(data, sl.attrs.axis, sl.attrs.start, lo, hi)
                yield sl.attrs.end, e, (f"{src.attrs.name}[..., :{e}] indexes {table}" if e < data.shape[sl.attrs.axis]
                                        else f"{src.attrs.name} indexes {table}")


def bound_symbols_by_tables(graph: Graph) -> tuple[Graph, PassReport]:
    """Lower symbol upper bounds so arange/slice-derived indices stay inside their tables."""
    symbols = dict(graph.symbols)
    tightest: dict[str, tuple[int, str]] = {}  # symbol -> (new upper bound, why)
    for end, limit, why in _end_limits(graph):
        lin = _linear_in_one(end)
        if lin is None or lin[0] not in symbols:
            continue
        name, c, k = lin
        new_hi = (limit - k) // c  # c * s + k <= limit
        if new_hi < tightest.get(name, (symbols[name].hi, ""))[0]:
            tightest[name] = (new_hi, why)
    lines = []
    for name, (new_hi, why) in tightest.items():
        s = symbols[name]
        if new_hi < s.lo:
            raise LLMCError(f"no {name} in its bounds [{s.lo}, {s.hi}] fits: {why} (needs {name} <= {new_hi})")
        lines.append(f"{name} bound lowered {s.hi} -> {new_hi}: {why}")
        symbols[name] = SymDim(name, s.lo, new_hi)
    if not lines:
        return graph, PassReport("bound_symbols_by_tables")
    out = Graph(graph.inputs, graph.outputs, graph.params, symbols, graph.output_names)
    return out, PassReport("bound_symbols_by_tables", {"symbols_lowered": len(lines)}, lines)
