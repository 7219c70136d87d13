"""SmoothQuant for W8A8: move activation outliers into the weights before both are rounded.

Following Xiao et al. (2023): y = x W^T = (x / s)(W s)^T for any per-input-channel s > 0. Int8
activations quantized per token lose the small channels of a row whose few outlier channels set
its scale; dividing channel c by s_c = max|x_c|^alpha / max|W_c|^(1 - alpha) flattens the rows at
the weights' expense. alpha is picked on a grid by the output error on calibration rows with both
sides rounded exactly as the kernel does (per-token int8 codes of x / s, per-channel int8 codes of
W s); alpha = 0 with s = 1 (plain W8A8) is on the grid, so the search never does worse than no
smoothing on the calibration rows.
"""
from __future__ import annotations

import numpy as np

from ...compiler.quant_layout import quantize_rows
from .rtn import Quantized, rtn

GRID = 10  # alpha in 0, 0.1, .., 0.9


def w8a8_error(x: np.ndarray, w: np.ndarray, qz: Quantized, inv_s: np.ndarray) -> float:
    """Mean squared output error of the W8A8 product against x @ w.T (float64)."""
    xq, sx = quantize_rows((x * inv_s).astype(np.float32))
    y = (xq.astype(np.int64) @ qz.q.astype(np.int64).T) * sx.astype(np.float64) * qz.scales[:, 0].astype(np.float64)
    return float(np.mean((y - x @ w.T) ** 2))


def smooth_scales(w: np.ndarray, x: np.ndarray, act_max: np.ndarray, scale_dtype=np.float32
                  ) -> tuple[np.ndarray, float, Quantized]:
    """(s [K], best alpha, int8 per-channel codes of W * s) for w [N, K] and calibration rows x [M, K]
    (act_max: max |x| per channel over every calibration token)."""
    w = np.asarray(w, np.float64)
    x = np.asarray(x, np.float64)
    a = np.maximum(np.asarray(act_max, np.float64), 1e-5)
    wmax = np.maximum(np.abs(w).max(axis=0), 1e-5)
    k = w.shape[1]
    best = (np.inf, None, None, None)
    for i in range(GRID):
        alpha = i / GRID
        s = np.ones(k) if alpha == 0 else a ** alpha / wmax ** (1 - alpha)
        s = s / np.sqrt(s.max() * s.min())
        s = s.astype(scale_dtype).astype(np.float64)  # the 1/s the graph carries is rounded the same way
        inv_s = (1.0 / s).astype(scale_dtype).astype(np.float64)
        qz = rtn(w * s, 8, k, True, scale_dtype)
        err = w8a8_error(x, w, qz, inv_s)
        if err < best[0]:
            best = (err, s, alpha, qz)
    return best[1], best[2], best[3]


__all__ = ["smooth_scales", "w8a8_error"]
