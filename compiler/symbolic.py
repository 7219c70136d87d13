"""Symbolic dimensions: named sizes with bounds, and integer polynomials over them.

Transformer shapes only ever need sums and products of a few symbols (batch, seq,
batch*seq after a flattening reshape), so a dim is either an int or a `SymExpr`, a
canonical polynomial with integer coefficients. Canonical form makes equality
structural, which shape inference and pattern matching rely on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

Monomial = tuple[str, ...]  # sorted symbol names, repeated for powers; () is the constant term


@dataclass(frozen=True)
class SymDim:
    """A named dynamic dimension with inclusive bounds (the upper bound sizes buffers)."""

    name: str
    lo: int = 1
    hi: int = 4096

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"symbolic dim name {self.name!r} is not an identifier")
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"symbolic dim {self.name}: bad bounds [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class SymExpr:
    terms: tuple[tuple[Monomial, int], ...]  # sorted, no zero coefficients

    @staticmethod
    def var(name: str) -> "SymExpr":
        return SymExpr((((name,), 1),))

    @staticmethod
    def _make(d: dict[Monomial, int]) -> "Dim":
        terms = tuple(sorted((m, c) for m, c in d.items() if c != 0))
        if not terms:
            return 0
        if len(terms) == 1 and terms[0][0] == ():
            return terms[0][1]
        return SymExpr(terms)

    def _dict(self) -> dict[Monomial, int]:
        return dict(self.terms)

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(s for m, _ in self.terms for s in m)

    def __add__(self, other: "Dim") -> "Dim":
        d = self._dict()
        for m, c in _terms(other):
            d[m] = d.get(m, 0) + c
        return SymExpr._make(d)

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return SymExpr._make({m: -c for m, c in self.terms})

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other)

    def __rsub__(self, other: "Dim") -> "Dim":
        return (-self) + other

    def __mul__(self, other: "Dim") -> "Dim":
        d: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in _terms(other):
                m = tuple(sorted(m1 + m2))
                d[m] = d.get(m, 0) + c1 * c2
        return SymExpr._make(d)

    __rmul__ = __mul__

    def __floordiv__(self, other: "Dim") -> "Dim":
        if isinstance(other, int) and other != 0 and all(c % other == 0 for _, c in self.terms):
            return SymExpr._make({m: c // other for m, c in self.terms})
        if isinstance(other, SymExpr):  # exact division by a single monomial, e.g. (b*s) // s
            (om, oc), = other.terms if len(other.terms) == 1 else ((None, 0),)
            if om is not None and all(_divides(om, m) and c % oc == 0 for m, c in self.terms):
                return SymExpr._make({_remove(m, om): c // oc for m, c in self.terms})
        raise NotImplementedError(f"inexact symbolic division ({self}) // ({other})")

    def evaluate(self, env: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms:
            v = c
            for s in m:
                v *= env[s]
            total += v
        return total

    def __str__(self) -> str:
        parts = []
        for m, c in reversed(self.terms):
            body = "*".join(m)
            if not m:
                parts.append(str(c))
            elif c == 1:
                parts.append(body)
            elif c == -1:
                parts.append("-" + body)
            else:
                parts.append(f"{c}*{body}")
        return " + ".join(parts).replace("+ -", "- ")

    __repr__ = __str__


Dim = Union[int, SymExpr]


def _terms(x: Dim) -> tuple[tuple[Monomial, int], ...]:
    if isinstance(x, SymExpr):
        return x.terms
    if isinstance(x, int):
        return (((), x),)
    raise TypeError(f"not a dim: {x!r}")


def _divides(small: Monomial, big: Monomial) -> bool:
    rest = list(big)
    for s in small:
        if s not in rest:
            return False
        rest.remove(s)
    return True


def _remove(big: Monomial, small: Monomial) -> Monomial:
    rest = list(big)
    for s in small:
        rest.remove(s)
    return tuple(rest)


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def exact_div(a: Dim, b: Dim) -> Dim | None:
    """a / b when it divides exactly (ints, or a polynomial by an int or by one monomial such
    as (b*s) / s), else None."""
    if isinstance(a, int):
        return a // b if isinstance(b, int) and b != 0 and a % b == 0 else None
    try:
        return a // b
    except NotImplementedError:
        return None


def evaluate(d: Dim, env: Mapping[str, int]) -> int:
    return d if isinstance(d, int) else d.evaluate(env)


def upper_bound(d: Dim, bounds: Mapping[str, SymDim]) -> int:
    """Largest value of `d` over the symbol boxes (exact for non-negative coefficients)."""
    if isinstance(d, int):
        return d
    hi = {s: bounds[s].hi for s in d.symbols}
    lo = {s: bounds[s].lo for s in d.symbols}
    total = 0
    for m, c in d.terms:
        total += SymExpr(((m, c),)).evaluate(hi if c > 0 else lo)
    return total


def substitute(d: Dim, values: Mapping[str, Dim]) -> Dim:
    """`d` with the named symbols replaced by dims (ints or other polynomials)."""
    if isinstance(d, int) or not d.symbols & values.keys():
        return d
    total: Dim = 0
    for m, c in d.terms:
        term: Dim = c
        for s in m:
            term = term * values.get(s, SymExpr.var(s))  # int * SymExpr goes through SymExpr.__rmul__
        total = total + term
    return total


def to_json(d: Dim) -> object:
    return d if isinstance(d, int) else [[c, list(m)] for m, c in d.terms]


def from_json(j: object) -> Dim:
    if isinstance(j, int):
        return j
    return SymExpr._make({tuple(m): c for c, m in j})  # type: ignore[misc]


def dims_equal(a: Dim, b: Dim) -> bool:
    return a == b
