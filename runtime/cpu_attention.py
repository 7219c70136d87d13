"""Attention of a CPU artifact as one library call (route "attn", function "attention").

out = softmax(q k^T * scale [+ mask] [causal]) v over float32 q [B, H, S, D], k [B, Hk, T, D],
v [B, Hk, T, Dv], out [B, H, S, Dv] (query head h reads key/value head h // (H / Hk)); causal:
query row i sees keys j <= i + T - S; the mask (bool: True = attend, or float32 added to the
scores) broadcasts to [B, H, S, T]; a row that sees no key gives zeros, as the TVM kernel does.

It runs in llmc's CPU kernel library (backends/cpu_gemm/llmc_attention.cc, shipped as the
artifact's gemm.so), whose loops stop at each causal row's last visible key; where that library
does not run (a processor without AVX-512F/VL), numpy computes the same formula.
"""
from __future__ import annotations

import ctypes
from typing import Mapping, Sequence

import numpy as np

from .cpu_gemm import Sgemm

ATTENTION_FUNC = "attention"
MASK_KINDS = {"": 0, "bool": 1, "float32": 2}  # the third scalar of an attn kernel


def attention_numpy(q, k, v, mask, scale: float, causal: bool, out: np.ndarray) -> None:
    """The formula in numpy (float32 scores, as the library computes them)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.matmul(q, k.swapaxes(-1, -2)) * np.float32(scale)
    seen = np.ones(s.shape[-2:], bool)
    if causal:
        S, T = s.shape[-2:]
        seen = np.arange(T)[None, :] <= np.arange(S)[:, None] + (T - S)
    s = np.where(seen, s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + mask
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(m == -np.inf, 0, m), dtype=np.float32)
    z = e.sum(axis=-1, keepdims=True)
    np.divide(np.matmul(e, v), np.where(z == 0, 1, z), out=out, casting="unsafe")


class AttentionCall:
    """A kernel of route "attn": its call's buffers are q, k, v, [mask,] out; scalars are
    scale, causal (0/1) and the mask's kind (MASK_KINDS)."""

    def __init__(self, spec, sgemm: Sgemm | None = None):
        self.scale = float(spec.scalars[0])
        self.causal = bool(spec.scalars[1])
        self.mask_kind = int(spec.scalars[2])
        self.sgemm = sgemm if sgemm is not None and sgemm.attention is not None else None

    def __call__(self, args: Sequence[np.ndarray], env: Mapping[str, int]) -> None:
        q, k, v = args[:3]
        mask = args[3] if self.mask_kind else None
        out = args[-1]
        B, H, S, D = q.shape
        Hk, T, Dv = k.shape[1], k.shape[2], v.shape[3]
        if k.shape != (B, Hk, T, D) or v.shape != (B, Hk, T, Dv) or out.shape != (B, H, S, Dv) or H % Hk:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}, out {out.shape} do not fit")
        if self.sgemm is None or not all(x.flags.c_contiguous for x in (q, k, v, out)):
            attention_numpy(q, k, v, mask, self.scale, self.causal, out)
            return
        strides = (ctypes.c_int64 * 4)()
        if mask is not None:  # right-aligned to [B, H, S, T]; a dim of 1 broadcasts (stride 0)
            pad = 4 - mask.ndim
            for i, (n, st) in enumerate(zip(mask.shape, mask.strides)):
                strides[pad + i] = 0 if n == 1 else st // mask.itemsize
        rc = self.sgemm.attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data,
                                  None if mask is None else mask.ctypes.data, self.mask_kind, strides,
                                  B, H, Hk, S, T, D, Dv, self.scale, int(self.causal), self.sgemm.threads)
        if rc != 0:
            raise RuntimeError(f"llmc_attention_f32 refused to run ({rc})")


__all__ = ["AttentionCall", "attention_numpy", "ATTENTION_FUNC", "MASK_KINDS"]
