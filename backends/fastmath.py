"""Vectorizable float32 exp / erf / tanh written in plain TIR arithmetic.

TVM lowers `tirx.exp`/`erf`/`tanh` on llvm to scalar libm calls, which a vectorized loop
then scalarizes (16 calls per AVX-512 vector). These polynomial forms are only adds,
multiplies, selects and a bit cast, so LLVM vectorizes them. Accuracy is a few float32 ulp
(cephes expf; the Eigen/XLA rational erf and tanh).
"""
from __future__ import annotations

from tvm import tirx

F32 = "float32"


def _c(v: float) -> tirx.PrimExpr:
    return tirx.const(v, F32)


def _dt(x) -> str:
    return str(x.ty.dtype)


def _poly(x, coeffs):
    """Horner evaluation, coeffs from the highest power down."""
    acc = _c(coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + _c(c)
    return acc


def exp_f32(x):
    """e^x for float32 x; exactly 0 below -87.3 (so exp(-inf) = 0) and inf above 88.72."""
    xc = tirx.max(tirx.min(x, _c(88.3762626647950)), _c(-87.3))
    n = tirx.floor(xc * _c(1.44269504088896341) + _c(0.5))
    r = xc - n * _c(0.693359375) - n * _c(-2.12194440e-4)  # Cody-Waite split of ln 2
    p = _poly(r, [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1])
    y = p * r * r + r + _c(1.0)
    scale = tirx.reinterpret(F32, (n.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32"))
    res = tirx.Select(x < _c(-87.3), _c(0.0), y * scale)
    return tirx.Select(x > _c(88.72), _c(float("inf")), res)


def erf_f32(x):
    xc = tirx.max(tirx.min(x, _c(4.0)), _c(-4.0))
    x2 = xc * xc
    p = _poly(x2, [-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                   -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02]) * xc
    q = _poly(x2, [-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02])
    return p / q


def tanh_f32(x):
    xc = tirx.max(tirx.min(x, _c(7.90531110763549805)), _c(-7.90531110763549805))
    x2 = xc * xc
    p = _poly(x2, [-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
                   1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03]) * xc
    q = _poly(x2, [1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03])
    return tirx.Select(tirx.abs(x) < _c(0.0004), x, p / q)


def exp(x):
    return exp_f32(x) if _dt(x) == F32 else tirx.exp(x)


def erf(x):
    return erf_f32(x) if _dt(x) == F32 else tirx.erf(x)


def tanh(x):
    return tanh_f32(x) if _dt(x) == F32 else tirx.tanh(x)


def sigmoid(x):
    one = tirx.const(1.0, _dt(x))
    return one / (one + exp(-x))
