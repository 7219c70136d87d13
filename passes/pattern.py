"""A small pattern-rewrite engine over the Graph IR.

Patterns are trees of `Var` (any node, bound by name), `P` (an op and sub-patterns),
`Const` (a scalar constant, by value or predicate), `Alt`, `OptCast` (skip casts) and
`Prod` (a product in any association and order). They also overload `+ - * / **`, so a
pattern reads like the numpy code it matches: `trace(lambda x: x * sigmoid(x))`.

Matching is backtracking (generators): every way a pattern matches is yielded in turn,
so a rule's replacement may decline one match and get the next. Rules and the driver
that applies them live in `rewrite.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..compiler import ir
from ..compiler.ir import Graph, Node
from ..compiler.ops import AxisAttrs, ReduceAttrs, Op

COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.MAXIMUM, Op.MINIMUM, Op.EQ, Op.NE, Op.AND, Op.OR})
_SCALAR_SOURCES = frozenset({Op.CONST, Op.FULL})
_SCALAR_WRAPPERS = frozenset({Op.CAST, Op.RESHAPE, Op.EXPAND})


def scalar_value(n: Node, params: Mapping[str, np.ndarray] | None = None) -> float | None:
    """The value of a node that holds one repeated constant (CONST, FULL, a 1-element weight),
    seen through casts, reshapes and expands; None otherwise."""
    while n.op in _SCALAR_WRAPPERS:
        n = n.inputs[0]
    if n.op in _SCALAR_SOURCES:
        return float(n.attrs.value)
    if n.op is Op.WEIGHT and params is not None:
        arr = params.get(n.attrs.name)
        if arr is not None and arr.size == 1 and arr.dtype.kind in "biuf":
            return float(arr.reshape(()))
    return None


@dataclass(frozen=True)
class VirtualConst:
    """A constant factor implied by the structure (x / c contributes 1/c), not a node."""
    value: float


class Match:
    """Bindings of one match; what a rule's replacement function receives."""

    def __init__(self, root: Node, ctx) -> None:  # ctx: rewrite._Context
        self.root = root
        self.ctx = ctx
        self.nodes: dict[str, Node] = {}
        self.consts: dict[str, float] = {}
        self.matched: list[Node] = []  # interior nodes (checked for exclusivity)
        self.shared: set[int] = set()  # interior nodes that may have outside users (casts)
        self.claimed: list[Node] = []

    # -- for replacement functions --------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        return self.ctx.new(self.nodes[name])

    def __contains__(self, name: str) -> bool:
        return name in self.nodes or name in self.consts

    def old(self, name: str) -> Node:
        return self.nodes[name]

    def const(self, name: str) -> float:
        return self.consts[name]

    def new(self, old_node: Node) -> Node:
        """The rewritten version of any node of the matched (previous) graph."""
        return self.ctx.new(old_node)

    def claim(self, *nodes: Node) -> None:
        """Mark further old nodes as absorbed by the replacement (checked for exclusivity)."""
        self.claimed.extend(nodes)

    def make(self, op: Op, inputs: Iterable[Node], attrs: object = None) -> Node:
        return ir.node(op, inputs, attrs, self.root.where)

    def scalar(self, n: Node) -> float | None:
        return scalar_value(n, self.ctx.params)

    def add_param(self, name: str, array: np.ndarray) -> Node:
        return self.ctx.add_param(name, array)

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        return self.ctx.params

    def users(self, old_node: Node) -> list[Node]:
        """Users of a node in the matched (previous) graph."""
        return self.ctx.users.get(old_node.uid, [])

    @property
    def graph(self) -> Graph:
        return self.ctx.graph


# ---- patterns ----------------------------------------------------------------------
class Pattern:
    def match(self, n: Node | VirtualConst, m: Match) -> Iterator[None]:
        """Yield once per way `n` matches, with `m` extended; undo on resumption."""
        raise NotImplementedError

    # pattern algebra, so patterns can be written (or traced) as plain arithmetic
    def __add__(self, o): return P(Op.ADD, self, lift(o))
    def __radd__(self, o): return P(Op.ADD, lift(o), self)
    def __sub__(self, o): return P(Op.SUB, self, lift(o))
    def __rsub__(self, o): return P(Op.SUB, lift(o), self)
    def __mul__(self, o): return Prod(self, lift(o))
    def __rmul__(self, o): return Prod(lift(o), self)
    def __neg__(self): return Alt(P(Op.NEG, self), Prod(self, Const(-1.0)))

    def __truediv__(self, o):
        if isinstance(o, (int, float)):
            return Prod(self, Const(1.0 / o))
        return P(Op.DIV, self, lift(o))

    def __rtruediv__(self, o):
        if isinstance(o, (int, float)) and o == 1:
            return reciprocal(self)
        return P(Op.DIV, lift(o), self)

    def __pow__(self, k):
        alts: list[Pattern] = [P(Op.POW, self, Const(float(k)))]
        if k == 2:
            alts.append(Prod(self, self))
        if k == 3:
            alts += [Prod(self, self, self), Prod(self, P(Op.POW, self, Const(2.0)))]
        return Alt(*alts)


def lift(x) -> Pattern:
    if isinstance(x, Pattern):
        return x
    if isinstance(x, (int, float)):
        return Const(float(x))
    raise TypeError(f"cannot use {x!r} in a pattern")


class Var(Pattern):
    """Any node; a name binds it, and a name used twice must bind the same node."""

    def __init__(self, name: str | None = None, pred: Callable[[Node], bool] | None = None) -> None:
        self.name, self.pred = name, pred

    def match(self, n, m):
        if isinstance(n, VirtualConst) or (self.pred is not None and not self.pred(n)):
            return
        if self.name is None:
            yield
            return
        prev = m.nodes.get(self.name)
        if prev is not None:
            if prev is n:
                yield
            return
        m.nodes[self.name] = n
        yield
        del m.nodes[self.name]


class P(Pattern):
    """A node of the given op(s) whose inputs match `inputs` (tried in both orders for
    commutative binary ops); `pred` sees the node (attrs, shapes); `name` binds it."""

    def __init__(self, op: Op | Iterable[Op], *inputs: Pattern, pred: Callable[[Node], bool] | None = None,
                 name: str | None = None, shared: bool = False, any_inputs: bool = False) -> None:
        self.ops = frozenset([op]) if isinstance(op, Op) else frozenset(op)
        self.inputs = tuple(lift(i) for i in inputs)
        self.pred, self.name, self.shared, self.any_inputs = pred, name, shared, any_inputs

    def match(self, n, m):
        if isinstance(n, VirtualConst) or n.op not in self.ops:
            return
        if not self.any_inputs and len(n.inputs) != len(self.inputs):
            return
        if self.pred is not None and not self.pred(n):
            return
        if self.name is not None:
            prev = m.nodes.get(self.name)
            if prev is not None and prev is not n:
                return
        orders = [n.inputs]
        if n.op in COMMUTATIVE and len(n.inputs) == 2 and n.inputs[0] is not n.inputs[1]:
            orders.append(n.inputs[::-1])
        bind = self.name is not None and self.name not in m.nodes
        if bind:
            m.nodes[self.name] = n
        m.matched.append(n)
        if self.shared:
            m.shared.add(n.uid)
        for ins in orders:
            if self.any_inputs:
                yield
                break
            yield from _match_seq(self.inputs, ins, 0, m)
        if self.shared:
            m.shared.discard(n.uid)
        m.matched.pop()
        if bind:
            del m.nodes[self.name]


def _match_seq(pats: Sequence[Pattern], nodes: Sequence, i: int, m: Match) -> Iterator[None]:
    if i == len(pats):
        yield
        return
    for _ in pats[i].match(nodes[i], m):
        yield from _match_seq(pats, nodes, i + 1, m)


class Const(Pattern):
    """A scalar constant: equal to `value` (relative tolerance), or satisfying `pred`."""

    def __init__(self, value: float | None = None, pred: Callable[[float], bool] | None = None,
                 name: str | None = None, rtol: float = 1e-4) -> None:
        self.value, self.pred, self.name, self.rtol = value, pred, name, rtol

    def match(self, n, m):
        v = n.value if isinstance(n, VirtualConst) else m.scalar(n)
        if v is None:
            return
        if self.value is not None and not math.isclose(v, self.value, rel_tol=self.rtol):
            return
        if self.pred is not None and not self.pred(v):
            return
        if self.name is None:
            yield
            return
        prev = m.consts.get(self.name)
        if prev is not None:
            if math.isclose(prev, v, rel_tol=self.rtol):
                yield
            return
        m.consts[self.name] = v
        yield
        del m.consts[self.name]


class Alt(Pattern):
    def __init__(self, *alts: Pattern) -> None:
        self.alts = tuple(lift(a) for a in alts)

    def match(self, n, m):
        for a in self.alts:
            yield from a.match(n, m)


class OptCast(Pattern):
    """`inner`, seen through any number of CAST nodes (which may also have other users)."""

    def __init__(self, inner: Pattern) -> None:
        self.inner = lift(inner)

    def match(self, n, m):
        if not isinstance(n, VirtualConst) and n.op is Op.CAST:
            m.matched.append(n)
            m.shared.add(n.uid)
            yield from self.match(n.inputs[0], m)
            m.shared.discard(n.uid)
            m.matched.pop()
        yield from self.inner.match(n, m)


class Prod(Pattern):
    """A product of the factor patterns, in any association and order; `x / c` for a
    scalar constant c counts as the factors x and 1/c."""

    def __init__(self, *factors: Pattern) -> None:
        flat: list[Pattern] = []
        for f in factors:
            f = lift(f)
            flat.extend(f.factors if isinstance(f, Prod) else [f])
        self.factors = tuple(flat)

    def match(self, n, m):
        k = len(self.factors)
        if isinstance(n, VirtualConst):
            return
        for facs, interior in _factorizations(n, k, m):
            m.matched.extend(interior)
            yield from _assign(self.factors, facs, [False] * k, 0, m)
            del m.matched[len(m.matched) - len(interior):]


def _factorizations(n: Node, k: int, m: Match) -> Iterator[tuple[list, list[Node]]]:
    if k == 1:
        yield [n], []
        return
    if n.op is Op.MUL:
        a, b = n.inputs
        for i in range(1, k):
            for fa, ia in _factorizations(a, i, m):
                for fb, ib in _factorizations(b, k - i, m):
                    yield fa + fb, [n] + ia + ib
    elif n.op is Op.DIV:
        c = m.scalar(n.inputs[1])
        if c:
            for fa, ia in _factorizations(n.inputs[0], k - 1, m):
                yield fa + [VirtualConst(1.0 / c)], [n] + ia


def _assign(pats, facs, used, i, m):
    if i == len(pats):
        yield
        return
    for j, f in enumerate(facs):
        if used[j]:
            continue
        used[j] = True
        for _ in pats[i].match(f, m):
            yield from _assign(pats, facs, used, i + 1, m)
        used[j] = False


class Check(Pattern):
    """`inner` with an extra check on the bindings made so far (e.g. shapes agree)."""

    def __init__(self, inner: Pattern, check: Callable[[Match], bool]) -> None:
        self.inner, self.check = lift(inner), check

    def match(self, n, m):
        for _ in self.inner.match(n, m):
            if self.check(m):
                yield


# ---- helpers for writing patterns as code ------------------------------------------
def _unary(op: Op):
    return lambda p: P(op, lift(p))


exp, erf, tanh, sigmoid, sqrt, rsqrt_op = (_unary(o) for o in (Op.EXP, Op.ERF, Op.TANH, Op.SIGMOID, Op.SQRT, Op.RSQRT))


def reciprocal(p) -> Pattern:
    p = lift(p)
    return Alt(P(Op.RECIPROCAL, p), P(Op.DIV, Const(1.0), p), P(Op.POW, p, Const(-1.0)))


def rsqrt(p) -> Pattern:
    """1/sqrt(p) in any of its spellings."""
    p = lift(p)
    return Alt(P(Op.RSQRT, p), reciprocal(P(Op.SQRT, p)), P(Op.POW, p, Const(-0.5)))


def last_axis(n: Node) -> bool:
    return isinstance(n.attrs, (ReduceAttrs, AxisAttrs)) and (
        n.attrs.axes == (n.inputs[0].type.rank - 1,) if isinstance(n.attrs, ReduceAttrs)
        else n.attrs.axis == n.inputs[0].type.rank - 1)


class MeanLast(Pattern):
    """mean(x, -1, keepdim=True), also spelled sum(x, -1, keepdim=True) / D."""

    def __init__(self, inner: Pattern) -> None:
        self.inner = lift(inner)
        self._sum, self._scale = f"__sum{id(self)}", f"__scale{id(self)}"

    def match(self, n, m):
        if isinstance(n, VirtualConst):
            return
        keep = lambda r: last_axis(r) and r.attrs.keepdims  # noqa: E731
        yield from P(Op.MEAN, self.inner, pred=keep).match(n, m)
        for _ in Prod(P(Op.SUM, self.inner, pred=keep, name=self._sum), Const(name=self._scale)).match(n, m):
            size = m.nodes[self._sum].inputs[0].shape[-1]
            if isinstance(size, int) and math.isclose(m.consts[self._scale] * size, 1.0, rel_tol=1e-5):
                yield


def cast(p) -> Pattern:
    return P(Op.CAST, lift(p))


def trace(fn: Callable[..., Pattern], *names: str) -> Pattern:
    """Turn a plain function over pattern values into a pattern, e.g.
    `trace(lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))), "x")`."""
    names = names or fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return lift(fn(*(Var(n) for n in names)))
