"""The numpy paged attention (runtime route "kv") against the dense attention reference:
ragged steps over shuffled pages, prefill in chunks then decode, GQA, sliding windows."""
from __future__ import annotations

import numpy as np
import pytest

from llmc.compiler.reference import attention_reference
from llmc.runtime.engine.kv_codec import SCALE_BYTES, decode, encode
from llmc.runtime.engine.paged_attention import PagedAttentionCall, paged_attention

H, HKV, D, PAGE = 4, 2, 8, 4


def _dense(q, k, v, window):
    """Causal (windowed) attention of one whole sequence: q/k/v [1, heads, n, D]."""
    n = q.shape[2]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    keep = (j <= i) & ((j > i - window) if window else True)
    return attention_reference(q, k, v, keep[None, None], 1 / np.sqrt(D), causal=False)


def _roundtrip(x, codec):
    """What a cache of `codec` gives back for x [..., D]: the reference's K/V for a quantized cache."""
    return x if not codec else decode(encode(x, codec), codec)


@pytest.mark.parametrize("codec", ["", "int8", "float8_e4m3fn"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("chunks", [[(11, 5, 2)], [(6, 3, 2), (5, 2, 0)], [(6, 3, 2), (1, 1, 1), (1, 1, 1)]])
def test_steps_over_pages_equal_dense_attention(window, chunks, codec):
    """chunks: per step, how many new tokens each of 3 sequences brings (0: not in the step).
    A quantized cache must equal dense attention over the K/V its codec round-trips."""
    rng = np.random.default_rng(len(chunks) * 10 + window)
    lens = [sum(c[s] for c in chunks) for s in range(3)]
    full = [[rng.standard_normal((1, h, n, D)).astype(np.float32) for h in (H, HKV, HKV)] for n in lens]
    if codec:  # 0xFF bytes: code -1 and a NaN scale, so a never-written slot read would poison the output
        cache = np.full((20, 2, PAGE, HKV, D + SCALE_BYTES), 0xFF, np.uint8)
    else:
        cache = np.full((20, 2, PAGE, HKV, D), np.nan, np.float32)  # never-written slots must never be read
    pages = rng.permutation(20)[:15].reshape(3, 5).astype(np.int32)  # shuffled, disjoint
    done = [0, 0, 0]
    for step in chunks:
        seqs = [s for s in range(3) if step[s]]
        parts = [[x[:, :, done[s]:done[s] + step[s]] for x in full[s]] for s in seqs]
        q, k, v = (np.concatenate([p[i] for p in parts], axis=2) for i in range(3))
        starts = np.concatenate([[0], np.cumsum([step[s] for s in seqs])]).astype(np.int32)
        kv_lens = np.array([done[s] + step[s] for s in seqs], np.int32)
        out = paged_attention(q, k, v, cache, pages[seqs], kv_lens, starts, 1 / np.sqrt(D), window, codec=codec)
        for r, s in enumerate(seqs):
            n = done[s] + step[s]
            qs, ks, vs = (x[:, :, :n] for x in full[s])
            ref = _dense(qs, _roundtrip(ks, codec), _roundtrip(vs, codec), window)[:, :, done[s]:n]
            np.testing.assert_allclose(out[:, :, starts[r]:starts[r + 1]], ref, rtol=1e-5, atol=1e-5)
        for s in seqs:
            done[s] += step[s]


def test_route_refuses_inconsistent_metadata():
    call = PagedAttentionCall(type("Spec", (), {"scalars": (0.3, 0)})())
    q = np.zeros((1, H, 3, D), np.float32)
    k = v = np.zeros((1, HKV, 3, D), np.float32)
    cache = np.zeros((4, 2, PAGE, HKV, D), np.float32)
    out = np.empty_like(q)
    ok = (np.zeros((1, 1), np.int32), np.array([3], np.int32), np.array([0, 3], np.int32))
    call([q, k, v, cache, *ok, out], {})
    with pytest.raises(ValueError, match="page_table"):
        call([q, k, v, cache, np.full((1, 1), 9, np.int32), ok[1], ok[2], out], {})
    with pytest.raises(ValueError, match="q_starts"):
        call([q, k, v, cache, ok[0], ok[1], np.array([0, 2], np.int32), out], {})
    with pytest.raises(ValueError, match="kv_lens"):
        call([q, k, v, cache, ok[0], np.array([9], np.int32), ok[2], out], {})


@pytest.mark.parametrize("codec_id", [1, 2])
def test_route_reads_the_codec_from_its_scalars(codec_id):
    """The kv route's third scalar names the cache's codec: the call equals the function with it."""
    codec = ("", "int8", "float8_e4m3fn")[codec_id]
    call = PagedAttentionCall(type("Spec", (), {"scalars": (0.3, 0, codec_id)})())
    rng = np.random.default_rng(codec_id)
    q = rng.standard_normal((1, H, 5, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, HKV, 5, D)).astype(np.float32) for _ in range(2))
    meta = (np.array([[1, 0]], np.int32), np.array([5], np.int32), np.array([0, 5], np.int32))
    caches = [np.zeros((3, 2, PAGE, HKV, D + SCALE_BYTES), np.uint8) for _ in range(2)]
    out = np.empty_like(q)
    call([q, k, v, caches[0], *meta, out], {})
    want = paged_attention(q, k, v, caches[1], *meta, 0.3, codec=codec)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(caches[0], caches[1])
    assert not np.allclose(want, paged_attention(q, k, v, np.zeros((3, 2, PAGE, HKV, D), np.float32), *meta, 0.3),
                           rtol=0, atol=1e-7)  # the codec changed something: it was used
