"""Round-to-nearest quantization of a weight [N, K] into the QMATMUL layout's integer codes.

Group parameters come from the group's range with zero inside it (so exact zeros stay
exact): asymmetric int4 scale = (max - min) / 15, zero = round(-min / scale) in 0..15;
symmetric int4 scale = max|w| / 7 around the fixed zero 8; int8 scale = max|w| / 127.
Scales are rounded to their storage dtype *before* the codes are computed, so the codes
are the best ones for the scale the kernel will actually read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...compiler.quant_layout import INT4_SYMMETRIC_ZERO


@dataclass
class Quantized:
    q: np.ndarray  # int codes [N, K] (int8 values -127..127, or int4 0..15), as int16
    scales: np.ndarray  # [N, K // group] float64 (already rounded to the storage dtype)
    zeros: np.ndarray | None  # [N, K // group] float64 integer values, None when symmetric

    def dequantize(self, group: int, bits: int) -> np.ndarray:
        s = np.repeat(self.scales, group, axis=1)
        z = np.repeat(self.zeros, group, axis=1) if self.zeros is not None else \
            (INT4_SYMMETRIC_ZERO if bits == 4 else 0)
        return (self.q.astype(np.float64) - z) * s


def group_params(w: np.ndarray, bits: int, symmetric: bool, scale_dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero) per row of w [N, G] (one group's columns): ([N], [N] or None)."""
    w = np.asarray(w, np.float64)
    if bits == 8 or symmetric:
        amax = np.abs(w).max(axis=1)
        scale = amax / (127.0 if bits == 8 else 7.0)
        scale = np.where(scale > 0, scale, 1.0)
        return _round_to(scale, scale_dtype), None
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    scale = (hi - lo) / 15.0
    scale = _round_to(np.where(scale > 0, scale, 1.0), scale_dtype)
    zero = np.clip(np.round(-lo / scale), 0, 15)
    return scale, zero


def _round_to(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x).astype(dtype).astype(np.float64)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """Codes of w [N, *] for per-row scale/zero [N] (broadcast over the columns)."""
    s = scale[:, None] if scale.ndim == 1 else scale
    if bits == 8:
        return np.clip(np.round(w / s), -127, 127)
    z = INT4_SYMMETRIC_ZERO if zero is None else (zero[:, None] if zero.ndim == 1 else zero)
    return np.clip(np.round(w / s) + z, 0, 15)


def rtn(w: np.ndarray, bits: int, group: int, symmetric: bool, scale_dtype=np.float32) -> Quantized:
    """Round-to-nearest codes and parameters for w [N, K] with groups of `group` columns."""
    w = np.asarray(w, np.float64)
    n, k = w.shape
    groups = k // group
    scales = np.empty((n, groups))
    zeros = None if (bits == 8 or symmetric) else np.empty((n, groups))
    q = np.empty((n, k), np.int16)
    for g in range(groups):
        cols = slice(g * group, (g + 1) * group)
        s, z = group_params(w[:, cols], bits, symmetric, scale_dtype)
        scales[:, g] = s
        if zeros is not None:
            zeros[:, g] = z
        q[:, cols] = quantize_codes(w[:, cols], s, z, bits)
    return Quantized(q, scales, zeros)


__all__ = ["Quantized", "rtn", "group_params", "quantize_codes"]
