"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For y = x W^T with calibration inputs X, the squared output error of a weight change is
(dW) H (dW)^T with H = X^T X. Following Frantar et al. (2022): with U the upper Cholesky
factor of H^-1 (dampened by `damp` x the mean diagonal), quantizing column j with error
e = (w_j - q_j) / U[j, j] is compensated exactly by w_{j+1:} -= e U[j, j+1:]. Updates are
applied lazily: inside a block of columns as each is quantized, to the rest of the matrix
once per block (one GEMM). Group parameters are taken when the walk reaches a group's
first column, from the already-updated weights; with act_order (columns in decreasing
H-diagonal order) they are fixed beforehand from the original weights (static groups), so
the stored layout keeps its natural group order.
"""
from __future__ import annotations

import numpy as np

from .rtn import Quantized, group_params, quantize_codes
from ...compiler.quant_layout import INT4_SYMMETRIC_ZERO


def _dequant_col(q, s, z, bits):
    zero = 0.0 if bits == 8 else (INT4_SYMMETRIC_ZERO if z is None else z)
    return (q - zero) * s


def gptq(w: np.ndarray, h: np.ndarray, bits: int, group: int, symmetric: bool, scale_dtype=np.float32,
         damp: float = 0.01, block: int = 128, act_order: bool = False) -> Quantized:
    """Codes and parameters for w [N, K] given the input Hessian h = X^T X [K, K]."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    n, k = w.shape
    dead = np.diag(h) == 0  # inputs never active: any value there is free, make it 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // group
    sym = bits == 8 or symmetric
    scales = np.empty((n, groups))
    zeros = None if sym else np.empty((n, groups))
    if act_order:  # static groups: parameters from the original weights, in natural order
        for g in range(groups):
            s, z = group_params(w[:, g * group:(g + 1) * group], bits, symmetric, scale_dtype)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z
        perm = np.argsort(-np.diag(h), kind="stable")
    else:
        perm = np.arange(k)
    w = w[:, perm]
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, so H^-1 = L^-T L^-1
    u = np.linalg.cholesky(hinv.T @ hinv).T  # upper factor of H^-1
    q = np.empty((n, k), np.int16)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].copy()
        err = np.empty_like(wb)
        for i in range(b1 - b0):
            j = b0 + i
            col = perm[j]
            g = col // group
            if not act_order and col % group == 0:  # the group starts here: its parameters from the updated weights
                cols = np.concatenate([wb[:, i:min(i + group, b1 - b0)], w[:, b1:j + group]], axis=1) \
                    if j + group > b1 else wb[:, i:i + group]
                s, z = group_params(cols, bits, symmetric, scale_dtype)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            s = scales[:, g]
            z = None if zeros is None else zeros[:, g]
            qc = quantize_codes(wb[:, i:i + 1], s, z, bits)[:, 0]
            q[:, col] = qc
            e = (wb[:, i] - _dequant_col(qc, s, z, bits)) / u[j, j]
            wb[:, i + 1:] -= np.outer(e, u[j, j + 1:b1])
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return Quantized(q, scales, zeros)


__all__ = ["gptq"]
