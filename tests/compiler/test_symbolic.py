import pytest

from llmc.compiler.symbolic import SymDim, SymExpr, evaluate, from_json, to_json, upper_bound

b, s = SymExpr.var("b"), SymExpr.var("s")


def test_polynomial_arithmetic_is_canonical():
    assert b * s == s * b
    assert (b * s + s) - s == b * s
    assert b - b == 0 and isinstance(b - b, int)
    assert (2 * b * s) // 2 == b * s
    assert (b * s * 64) // s == 64 * b
    assert str(b * s * 2 + 3) == "2*b*s + 3"


def test_inexact_division_is_refused():
    with pytest.raises(NotImplementedError):
        (b + 1) // 2


def test_evaluate_bounds_and_json_roundtrip():
    e = b * s * 4 + 7
    assert evaluate(e, {"b": 2, "s": 5}) == 47
    bounds = {"b": SymDim("b", 1, 8), "s": SymDim("s", 1, 128)}
    assert upper_bound(e, bounds) == 8 * 128 * 4 + 7
    assert upper_bound(s - 1, bounds) == 127
    assert from_json(to_json(e)) == e
    assert from_json(to_json(5)) == 5


def test_symdim_validates():
    with pytest.raises(ValueError):
        SymDim("not an id", 1, 2)
    with pytest.raises(ValueError):
        SymDim("n", 5, 2)
