"""AWQ: protect the weights that meet large activations by scaling input channels first.

Following Lin et al. (2023): y = x W^T = (x / s) (W s)^T for any per-input-channel s > 0.
Scaling channel c of W up by s_c before rounding shrinks its relative rounding error; the
activation side carries 1 / s. With s = mean|x_c|^alpha (normalised to geometric mean 1),
alpha is picked on a grid by the output error on calibration rows, measured with the same
round-to-nearest the final weights use. alpha = 0 is plain RTN, so the search never does
worse than RTN on the calibration rows.
"""
from __future__ import annotations

import numpy as np

from .rtn import Quantized, rtn

GRID = 20


def awq_scales(w: np.ndarray, x: np.ndarray, act_mean: np.ndarray, bits: int, group: int, symmetric: bool,
               scale_dtype=np.float32) -> tuple[np.ndarray, float, Quantized]:
    """(s [K], best alpha, codes of W * s) for w [N, K], calibration rows x [M, K] and the
    per-channel mean |x| over all calibration tokens."""
    w = np.asarray(w, np.float64)
    x = np.asarray(x, np.float64)
    ref = x @ w.T
    mean = np.maximum(np.asarray(act_mean, np.float64), 1e-8)
    best = (np.inf, None, None, None)
    for i in range(GRID):
        alpha = i / GRID
        s = mean ** alpha
        s = s / np.sqrt(s.max() * s.min())
        s = s.astype(scale_dtype).astype(np.float64)  # the 1/s the graph carries is rounded the same way
        qz = rtn(w * s, bits, group, symmetric, scale_dtype)
        wq = qz.dequantize(group, bits) / s
        err = float(np.mean((x @ wq.T - ref) ** 2))
        if err < best[0]:
            best = (err, s, alpha, qz)
    return best[1], best[2], best[3]


__all__ = ["awq_scales"]
