"""Paged attention over a ragged token axis, in numpy (the CPU route of Op.PAGED_ATTENTION,
and the compiler's reference for it).

One call serves a whole step: the tokens of S sequences lie on one axis; sequence s owns
tokens q_starts[s]:q_starts[s+1], the newest of its kv_lens[s] positions. Their K/V are
written into the sequence's pages first (token at position p: page page_table[s, p // P],
slot p % P), then every token attends over positions <= its own (and > p - window with a
sliding window). A step where every sequence brings one token (decode) is done for all
sequences at once; otherwise sequence by sequence.
"""
from __future__ import annotations

import numpy as np


def _token_slots(page_table: np.ndarray, kv_lens: np.ndarray, q_starts: np.ndarray, page: int):
    """(page, slot, position) of every token of the step, in token order."""
    counts = np.diff(q_starts)
    seq = np.repeat(np.arange(len(counts)), counts)
    first = kv_lens - counts  # position of each sequence's first new token
    pos = first[seq] + (np.arange(int(q_starts[-1])) - q_starts[:-1][seq])
    return page_table[seq, pos // page], pos % page, pos


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


def paged_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: np.ndarray, page_table: np.ndarray,
                    kv_lens: np.ndarray, q_starts: np.ndarray, scale: float, window: int = 0,
                    out: np.ndarray | None = None) -> np.ndarray:
    """q [1, H, T, D]; k, v [1, Hkv, T, D]; cache [pages, 2, P, Hkv, D] (written in place)."""
    _, h, t, d = q.shape
    hkv, page = k.shape[1], cache.shape[2]
    group = h // hkv
    pages, slots, pos = _token_slots(page_table, kv_lens, q_starts, page)
    cache[pages, 0, slots] = k[0].transpose(1, 0, 2)
    cache[pages, 1, slots] = v[0].transpose(1, 0, 2)
    if out is None:
        out = np.empty_like(q)
    n_seq = len(kv_lens)
    if t == n_seq:  # one token per sequence: all at once, keys padded to the longest history
        cols = -(-int(kv_lens.max()) // page)
        kv = cache[page_table[:, :cols]]  # [S, cols, 2, P, Hkv, D]
        kv = kv.transpose(0, 2, 4, 1, 3, 5).reshape(n_seq, 2, hkv, cols * page, d)
        key = np.arange(cols * page)
        # slots past a sequence's length hold whatever the page held before (even NaN): zero them,
        # since a masked score still multiplies its value row (0 * NaN = NaN)
        kv = np.where((key[None, :] < kv_lens[:, None])[:, None, None, :, None], kv, 0)
        qs = q[0].transpose(1, 0, 2).reshape(n_seq, hkv, group, d)
        s = np.matmul(qs, kv[:, 0].transpose(0, 1, 3, 2)) * scale  # [S, Hkv, group, L]
        keep = key[None, :] <= pos[:, None]
        if window:
            keep &= key[None, :] > pos[:, None] - window
        s = np.where(keep[:, None, None, :], s, -np.inf)
        o = np.matmul(_softmax_rows(s), kv[:, 1])  # [S, Hkv, group, D]
        out[0] = o.reshape(n_seq, h, d).transpose(1, 0, 2)
        return out
    for s_i in range(n_seq):
        a, b = int(q_starts[s_i]), int(q_starts[s_i + 1])
        if a == b:
            continue
        n = int(kv_lens[s_i])
        cols = -(-n // page)
        kv = cache[page_table[s_i, :cols]].transpose(1, 3, 0, 2, 4).reshape(2, hkv, cols * page, d)[:, :, :n]
        qs = q[0, :, a:b].reshape(hkv, group * (b - a), d)
        s = np.matmul(qs, kv[0].transpose(0, 2, 1)).reshape(hkv, group, b - a, n) * scale
        key = np.arange(n)
        keep = key[None, :] <= pos[a:b, None]
        if window:
            keep &= key[None, :] > pos[a:b, None] - window
        s = np.where(keep, s, -np.inf)
        o = np.matmul(_softmax_rows(s).reshape(hkv, group * (b - a), n), kv[1])
        out[0, :, a:b] = o.reshape(h, b - a, d)
    return out


class PagedAttentionCall:
    """A kernel of route "kv": its call's 8 buffers are q, k, v, kv_cache, page_table,
    kv_lens, q_starts, out (checked by the manifest parser); scalars are scale, window."""

    def __init__(self, spec):
        self.scale = float(spec.scalars[0])
        self.window = int(spec.scalars[1])

    def __call__(self, args, env) -> None:
        q, k, v, cache, table, lens, starts, out = args
        if int(starts[-1]) != q.shape[2] or len(lens) != len(starts) - 1 or np.any(np.diff(starts) < 0):
            raise ValueError(f"q_starts {starts.tolist()} do not split the step's {q.shape[2]} tokens")
        if np.any(lens < np.diff(starts)) or np.any(lens > table.shape[1] * cache.shape[2]):
            raise ValueError("kv_lens outside what the sequence's new tokens and page table allow")
        if table.size and (table.min() < 0 or table.max() >= cache.shape[0]):
            raise ValueError(f"page_table names a page outside the pool of {cache.shape[0]}")
        paged_attention(q, k, v, cache, table, lens, starts, self.scale, self.window, out=out)
