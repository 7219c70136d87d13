"""The packed weight layout of Op.QMATMUL, in numpy: pack, unpack, dequantize.

One place defines the bytes every consumer reads (the numpy reference, the TVM kernels,
the CUDA kernels, the artifact): weights are output-channel major like torch.nn.Linear,
[N, K] with K contiguous.

- int8: qweight int8 [N, K]; W = q * scale; scales [N, K // group] (group = K: one per row).
- int4: qweight uint8 [N, K // 2]; element k = 2i is the LOW nibble of byte i, k = 2i + 1 the
  HIGH nibble, values unsigned 0..15; W = (q - zero) * scale per group of `group` consecutive
  elements of K; scales and zeros [N, K // group], both in the scales' float dtype.
  Symmetric int4 has zero = 8 everywhere and may leave the zeros array out.
"""
from __future__ import annotations

import numpy as np

INT4_SYMMETRIC_ZERO = 8


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[N, K] integers in 0..15 -> uint8 [N, K // 2] (even k low nibble, odd k high nibble)."""
    q = np.asarray(q)
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {q.shape}")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError("int4 values must lie in 0..15")
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0..15 (inverse of pack_int4)."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def dequantize(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group: int,
               dtype=np.float64) -> np.ndarray:
    """The float weight [N, K] a packed weight stands for (computed in float64, then `dtype`)."""
    if bits == 8:
        q = np.asarray(qweight).astype(np.float64)
        zero = 0.0 if zeros is None else np.repeat(np.asarray(zeros, np.float64), group, axis=-1)
    elif bits == 4:
        q = unpack_int4(qweight).astype(np.float64)
        zero = float(INT4_SYMMETRIC_ZERO) if zeros is None else np.repeat(np.asarray(zeros).astype(np.float64),
                                                                           group, axis=-1)
    else:
        raise ValueError(f"unsupported bit width {bits}")
    s = np.repeat(np.asarray(scales).astype(np.float64), group, axis=-1)
    return ((q - zero) * s).astype(dtype)


ROW_SCALE_FLOOR = 1e-6  # max|row| below this counts as this: a zero row's codes are 0, not 0 / 0


E4M3_MAX = 448.0  # float8 e4m3fn's largest finite value


def row_scales(x: np.ndarray, qmax: float = 127.0) -> np.ndarray:
    """W8A8's activation scales per row (last axis), in x's dtype: max(max|row|, floor) / qmax
    (127 for int8, 448 for e4m3; the ops the quantize pass puts before each such matmul compute
    exactly this)."""
    x = np.asarray(x)
    amax = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), x.dtype.type(ROW_SCALE_FLOOR))
    return (amax / x.dtype.type(qmax)).astype(x.dtype)


def float8_codes(v: np.ndarray) -> np.ndarray:
    """float8 e4m3fn bit patterns (uint8) of v, round-half-even (|v| <= 448 expected)."""
    import ml_dtypes

    return np.asarray(v, np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def float8_values(codes: np.ndarray) -> np.ndarray:
    """The float64 values of float8 e4m3fn bit patterns."""
    import ml_dtypes

    return np.asarray(codes, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def quantize_codes_rows(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes of x's rows for their scales: round-half-even(x / scale) clipped to [-127, 127]
    (the division in float32, as the kernels do)."""
    q = np.rint(np.asarray(x, np.float32) / np.asarray(scales, np.float32))
    return np.clip(q, -127, 127).astype(np.int8)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [..., K], scales [..., 1]) of x's rows, as a W8A8 matmul sees them."""
    scales = row_scales(x)
    return quantize_codes_rows(x, scales), scales


__all__ = ["pack_int4", "unpack_int4", "dequantize", "quantize_rows", "quantize_codes_rows", "row_scales",
           "float8_codes", "float8_values", "E4M3_MAX", "ROW_SCALE_FLOOR", "INT4_SYMMETRIC_ZERO"]
