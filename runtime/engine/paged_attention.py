"""Paged attention over a ragged token axis, in numpy (the CPU route of Op.PAGED_ATTENTION,
and the compiler's reference for it).

One call serves a whole step: the tokens of S sequences lie on one axis; sequence s owns
tokens q_starts[s]:q_starts[s+1], the newest of its kv_lens[s] positions. Their K/V are
written into the sequence's pages first (token at position p: page page_table[s, p // P],
slot p % P), then every token attends over positions <= its own (and > p - window with a
sliding window), sequence by sequence: each sequence's keys are gathered from its pages in one
copy (only its written positions are read), and a decode row needs no mask. (Padding all
sequences to the longest and doing them in one batch measured 2x slower at 4 sequences.)
A quantized cache (`codec` "int8" or "float8_e4m3fn", kv_codec.py) is encoded as it is
written and decoded as a sequence's keys are gathered: attention itself runs in q's dtype.
"""
from __future__ import annotations

import numpy as np

from .kv_codec import CODEC_IDS, decode, encode


def _append(k: np.ndarray, v: np.ndarray, cache: np.ndarray, page_table: np.ndarray, kv_lens: np.ndarray,
            counts: np.ndarray, codec: str = "") -> np.ndarray:
    """Write the step's K/V into the pages; returns each token's position."""
    page = cache.shape[2]
    if k.shape[2] == len(kv_lens):  # decode: one token per sequence, the newest position
        seq, pos = np.arange(len(kv_lens)), kv_lens.astype(np.int64) - 1
    else:
        seq = np.repeat(np.arange(len(counts)), counts)
        starts = np.cumsum(counts) - counts
        pos = (kv_lens - counts)[seq] + (np.arange(k.shape[2]) - starts[seq])
    pages, slots = page_table[seq, pos // page], pos % page
    for i, x in enumerate((k, v)):
        rows = x[0].transpose(1, 0, 2)  # [T, Hkv, D]
        cache[pages, i, slots] = encode(rows, codec) if codec else rows
    return pos


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


# From this many multiply-adds a head's product goes to llmc's CPU GEMM when the executor has
# it: numpy's OpenBLAS would wake its own threads, which then yield-spin against llmc's GEMM
# workers for milliseconds (a 256-token prefill step took 2.1x as long, measured). Smaller
# products (decode rows) stay in numpy, which runs them on the calling thread.
GEMM_MIN_MACS = 1 << 18


def _products_nt(a: np.ndarray, w: np.ndarray, sgemm) -> np.ndarray:
    """out[h] = a[h] @ w[h]^T for a [H, M, K] and w [H, N, K] (K-contiguous rows)."""
    h, m, k = a.shape
    if sgemm is None or h * m * k * w.shape[1] < GEMM_MIN_MACS:
        return np.matmul(a, w.transpose(0, 2, 1))
    out = np.empty((h, m, w.shape[1]), np.result_type(a, w))
    for i in range(h):
        if sgemm.takes(a[i], w[i], out[i]):
            sgemm(a[i], w[i], out[i])
        else:
            np.matmul(a[i], w[i].T, out=out[i])
    return out


def _attend(q: np.ndarray, cache: np.ndarray, pages: np.ndarray, n_kv: int, first: int, scale: float,
            window: int, codec: str = "", sgemm=None) -> np.ndarray:
    """One sequence: q [H, n, D] at positions first..first+n-1 over its n_kv cached positions.
    `sgemm`: llmc's CPU GEMM (runtime/cpu_gemm.py) for the larger products, or None."""
    h, n, d = q.shape
    hkv = cache.shape[3]
    group = h // hkv
    row = cache.shape[4]  # D, or D + the scale's bytes in a quantized cache
    keys = cache[pages, 0].reshape(-1, hkv, row)[:n_kv]  # [n_kv, Hkv, D]: one gather, a contiguous copy
    values = cache[pages, 1].reshape(-1, hkv, row)[:n_kv]
    if codec:
        keys, values = decode(keys, codec, q.dtype), decode(values, codec, q.dtype)
    s = _products_nt(q.reshape(hkv, group * n, d), keys.transpose(1, 0, 2), sgemm).reshape(hkv, group, n, n_kv)
    s *= scale
    if n > 1 or (window and n_kv > window):  # the last query row sees every key: no mask for plain decode
        key = np.arange(n_kv)
        qpos = np.arange(first, first + n)[:, None]
        keep = key <= qpos
        if window:
            keep &= key > qpos - window
        s = np.where(keep, s, -np.inf)
    p = _softmax_rows(s).reshape(hkv, group * n, n_kv)
    if sgemm is None or p.size * d < GEMM_MIN_MACS:
        o = np.matmul(p, values.transpose(1, 0, 2))
    else:  # values^T [Hkv, D, n_kv]: K-contiguous for the GEMM
        o = _products_nt(p, np.ascontiguousarray(values.transpose(1, 2, 0)), sgemm)
    return o.reshape(h, n, d)


def paged_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: np.ndarray, page_table: np.ndarray,
                    kv_lens: np.ndarray, q_starts: np.ndarray, scale: float, window: int = 0,
                    out: np.ndarray | None = None, counts: np.ndarray | None = None, codec: str = "",
                    sgemm=None) -> np.ndarray:
    """q [1, H, T, D]; k, v [1, Hkv, T, D]; cache [pages, 2, P, Hkv, D] (written in place), or
    uint8 [pages, 2, P, Hkv, D + 4] for a quantized `codec`. `counts`: np.diff(q_starts), when
    the caller has it; `sgemm`: see _attend."""
    page = cache.shape[2]
    counts = np.diff(q_starts) if counts is None else counts
    pos = _append(k, v, cache, page_table, kv_lens, counts, codec)
    if out is None:
        out = np.empty_like(q)
    a = 0
    for s_i in range(len(kv_lens)):
        n, n_kv = int(counts[s_i]), int(kv_lens[s_i])
        if n:
            pages = page_table[s_i, :-(-n_kv // page)]
            out[0, :, a:a + n] = _attend(q[0, :, a:a + n], cache, pages, n_kv, n_kv - n, scale, window, codec, sgemm)
        a += n
    return out


class PagedAttentionCall:
    """A kernel of route "kv": its call's 8 buffers are q, k, v, kv_cache, page_table,
    kv_lens, q_starts, out (checked by the manifest parser); scalars are scale, window and,
    for a quantized cache, its codec's index in kv_codec.CODEC_IDS."""

    def __init__(self, spec, sgemm=None):
        self.sgemm = sgemm  # llmc's CPU GEMM for prefill-sized products (see _attend), or None
        self.scale = float(spec.scalars[0])
        self.window = int(spec.scalars[1])
        self.codec = CODEC_IDS[int(spec.scalars[2])] if len(spec.scalars) > 2 else ""

    def __call__(self, args, env) -> None:
        q, k, v, cache, table, lens, starts, out = args
        counts = np.diff(starts)
        if int(starts[0]) != 0 or int(starts[-1]) != q.shape[2] or len(lens) != len(counts) or counts.min() < 0:
            raise ValueError(f"q_starts {starts.tolist()} do not split the step's {q.shape[2]} tokens")
        if (lens - counts).min() < 0 or lens.max() > table.shape[1] * cache.shape[2]:
            raise ValueError("kv_lens outside what the sequence's new tokens and page table allow")
        if table.min() < 0 or table.max() >= cache.shape[0]:
            raise ValueError(f"page_table names a page outside the pool of {cache.shape[0]}")
        paged_attention(q, k, v, cache, table, lens, starts, self.scale, self.window, out=out, counts=counts,
                        codec=self.codec, sgemm=self.sgemm)
