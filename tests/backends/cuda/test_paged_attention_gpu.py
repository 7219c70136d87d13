"""GPU checks of llmc_paged_attention, the CUDA shim's kernel of the step function (run on the
GPU machine: pytest -m gpu tests/backends/cuda).

Reference: llmc's own numpy
paged attention (runtime/engine/paged_attention.py, the CPU route and the compiler's
reference, itself checked against torch eager), fed the same bf16 values as float32. Outputs
are poisoned with NaN so that unwritten elements fail."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------- paged attention
def _reference():
    try:
        from llmc.runtime.engine.paged_attention import paged_attention
    except ImportError:
        from runtime.engine.paged_attention import paged_attention
    return paged_attention


def _case(seed, lens_new, lens_old, hq, hkv, d, page, dtype, pages=None, cols=None):
    """A step: sequence s brings lens_new[s] tokens after lens_old[s] cached positions (a page
    table of `cols` columns: by default one more than the longest sequence needs)."""
    rng = np.random.default_rng(seed)
    S, T = len(lens_new), sum(lens_new)
    cols = cols or max(-(-(o + n) // page) for o, n in zip(lens_old, lens_new)) + 1
    pages = pages or S * cols + 3
    perm = rng.permutation(pages)  # pages scattered through the pool
    table = perm[:S * cols].reshape(S, cols).astype(np.int32)
    cache = (rng.standard_normal((pages, 2, page, hkv, d)) * 0.5).astype(np.float32)
    q = rng.standard_normal((1, hq, T, d)).astype(np.float32)
    k = rng.standard_normal((1, hkv, T, d)).astype(np.float32)
    v = rng.standard_normal((1, hkv, T, d)).astype(np.float32)
    rnd = lambda x: torch.from_numpy(x).to(DT[dtype]).float().numpy()  # the values the GPU sees
    q, k, v, cache = rnd(q), rnd(k), rnd(v), rnd(cache)
    lens = np.asarray([o + n for o, n in zip(lens_old, lens_new)], np.int32)
    starts = np.concatenate([[0], np.cumsum(lens_new)]).astype(np.int32)
    return q, k, v, cache, table, lens, starts


def _run_gpu(shim, case, dtype, scale, window, token_major=False):
    """token_major: q/k/v/out passed as [1, T, heads, D] (layout bits 1|2|4|8)."""
    q, k, v, cache, table, lens, starts = case
    to = lambda x: torch.from_numpy(x).to(DT[dtype]).cuda()
    qg, kg, vg, cg = to(q), to(k), to(v), to(cache)
    out = torch.full(qg.shape, float("nan"), dtype=DT[dtype], device="cuda")
    ints = [torch.from_numpy(x).cuda() for x in (table, lens, starts)]
    if token_major:
        tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (qg, kg, vg))
        tout = out.transpose(1, 2).contiguous()
        shim["llmc_paged_attention"](tq, tk, tv, cg, *ints, tout, scale, window, 15)
        out = tout.transpose(1, 2)
    else:
        shim["llmc_paged_attention"](qg, kg, vg, cg, *ints, out, scale, window, 0)
    torch.cuda.synchronize()
    return out, cg


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("d,hq,hkv", [(64, 32, 8), (128, 8, 8), (32, 12, 4), (64, 40, 2)])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("token_major", [False, True])
def test_paged_attention_mixed_step_matches_reference(shim, dtype, d, hq, hkv, window, token_major):
    # prefill from scratch, a chunk after a cached prefix, decodes of short and long histories
    lens_new, lens_old = [19, 5, 1, 1, 33], [0, 40, 3, 100, 16]
    case = _case(d + hq + window, lens_new, lens_old, hq, hkv, d, 16, dtype)
    scale = 1 / math.sqrt(d)
    want_cache = case[3].copy()
    ref = _reference()(*case[:3], want_cache, *case[4:], scale, window)
    out, cache = _run_gpu(shim, case, dtype, scale, window, token_major)
    assert not torch.isnan(out).any()
    assert rel_err(out.float().cpu(), torch.from_numpy(ref)) < 1e-2
    # the step's K/V landed in the pages, exactly (a copy)
    assert torch.equal(cache.float().cpu(), torch.from_numpy(want_cache))


@pytest.mark.parametrize("dtype", ["bf16"])
@pytest.mark.parametrize("hist", [[511], [8191], [5, 700, 3000, 64, 1, 129, 2048, 31]])
def test_paged_attention_decode_split_matches_reference(shim, dtype, hist):
    """Decode steps (T == S): the keys are split across blocks and merged (flash-decoding)."""
    lens_new = [1] * len(hist)
    case = _case(len(hist) + hist[0], lens_new, hist, 32, 8, 64, 16, dtype)
    want_cache = case[3].copy()
    ref = _reference()(*case[:3], want_cache, *case[4:], 0.125, 0)
    out, _ = _run_gpu(shim, case, dtype, 0.125, 0, token_major=len(hist) > 1)
    assert rel_err(out.float().cpu(), torch.from_numpy(ref)) < 1e-2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("d,hq,hkv", [(64, 32, 8), (128, 8, 8), (32, 12, 4), (64, 16, 2), (64, 14, 2), (128, 40, 2)])
@pytest.mark.parametrize("window", [0, 100])
@pytest.mark.parametrize("hist,cols", [([0, 1, 15, 16, 17], None), ([513], 64), ([3, 260], 512),
                                       ([1000, 37, 4095, 2, 640, 129, 300, 77, 5, 2047, 64, 700, 1, 1500, 33, 3000], None)])
def test_paged_decode_matches_reference(shim, dtype, d, hq, hkv, window, hist, cols):
    """Decode steps over float pages (llmc_paged_decode.cu for up to 8 query heads a KV head; the
    40 / 2 case takes the general kernel): GQA groups of 1, 3, 4, 7, 8 and 20, head dims 32 / 64
    / 128, a window, histories of 0 to 4095 keys, a page table much wider than the histories
    (many key splits with nothing to do); the step's K / V appended to the pages exactly."""
    case = _case(sum(hist) + d + hq + window, [1] * len(hist), hist, hq, hkv, d, 16, dtype, cols=cols)
    scale = 1 / math.sqrt(d)
    want_cache = case[3].copy()
    ref = _reference()(*case[:3], want_cache, *case[4:], scale, window)
    out, cache = _run_gpu(shim, case, dtype, scale, window, token_major=len(hist) > 2)
    assert not torch.isnan(out).any()
    assert rel_err(out.float().cpu(), torch.from_numpy(ref)) < 1e-2
    assert torch.equal(cache.float().cpu(), torch.from_numpy(want_cache))


def _run_gpu_quantized(shim, case, codes, codec, scale, token_major):
    """The step over a quantized cache (uint8 rows `codes`): layout bits 16 int8, 32 e4m3."""
    from llmc.runtime.engine.kv_codec import CODEC_IDS

    q, k, v, _, table, lens, starts = case
    to = lambda x: torch.from_numpy(x).to(torch.bfloat16).cuda()
    qg, kg, vg = to(q), to(k), to(v)
    cg = torch.from_numpy(codes).cuda()
    out = torch.full(qg.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    ints = [torch.from_numpy(x).cuda() for x in (table, lens, starts)]
    layout = 16 * CODEC_IDS.index(codec)
    if token_major:
        tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (qg, kg, vg))
        tout = out.transpose(1, 2).contiguous()
        shim["llmc_paged_attention"](tq, tk, tv, cg, *ints, tout, scale, 0, 15 | layout)
        out = tout.transpose(1, 2)
    else:
        shim["llmc_paged_attention"](qg, kg, vg, cg, *ints, out, scale, 0, layout)
    torch.cuda.synchronize()
    return out, cg


@pytest.mark.parametrize("codec", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("steps", ["mixed", "decode"])
def test_paged_attention_over_a_quantized_cache(shim, codec, steps):
    """int8 / e4m3 pages (codes and a float32 scale per token and head): the step's K/V encoded
    into exactly the bytes the CPU route writes, and the attention (every key decoded from the
    pages, the step's own included) within 2e-2 of llmc's numpy route over the same cache."""
    from llmc.runtime.engine.kv_codec import encode

    if steps == "mixed":  # prefill from scratch, a chunk after a cached prefix, short and long decodes
        lens_new, lens_old, d, hq, hkv = [19, 5, 1, 1, 33], [0, 40, 3, 100, 16], 64, 32, 8
    else:  # decodes split across blocks (flash-decoding), D 128
        lens_new, lens_old, d, hq, hkv = [1, 1, 1], [8191, 700, 5], 128, 16, 4
    case = _case(len(codec) + d, lens_new, lens_old, hq, hkv, d, 16, "bf16")
    codes = encode(case[3], codec)  # the cached history as codes
    want_codes = codes.copy()
    scale = 1 / math.sqrt(d)
    ref = _reference()(*case[:3], want_codes, *case[4:], scale, 0, codec=codec)
    for token_major in (False, True):
        out, got_codes = _run_gpu_quantized(shim, case, codes.copy(), codec, scale, token_major)
        assert not torch.isnan(out).any()
        assert rel_err(out.float().cpu(), torch.from_numpy(ref)) < 2e-2
        assert torch.equal(got_codes.cpu(), torch.from_numpy(want_codes))  # the same codes and scales


def test_paged_attention_bad_arguments_raise(shim):
    q = torch.zeros(1, 4, 2, 48, dtype=torch.bfloat16, device="cuda")  # head dim 48: not offered
    kv = torch.zeros(1, 2, 2, 48, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(4, 2, 16, 2, 48, dtype=torch.bfloat16, device="cuda")
    ints = [torch.zeros(1, 2, dtype=torch.int32, device="cuda"), torch.tensor([2], dtype=torch.int32, device="cuda"),
            torch.tensor([0, 2], dtype=torch.int32, device="cuda")]
    with pytest.raises(ValueError, match="head dim"):
        shim["llmc_paged_attention"](q, kv, kv, cache, *ints, q.clone(), 0.1, 0, 0)


def test_decode_graph_survives_a_larger_later_decode(shim):
    """A decode step captured in a CUDA graph, then a larger decode that needs more key-split
    workspace, then the first graph replayed: the graph still writes into live memory (the
    workspace it was captured with is kept) and gives the reference's output. (Freeing the
    outgrown workspace made a serving engine's replays write into freed memory.)"""
    dtype, d, hq, hkv, page = "bf16", 64, 32, 8, 16
    scale = 1 / math.sqrt(d)
    small = _case(1, [1], [700], hq, hkv, d, page, dtype)
    q, k, v, cache, table, lens, starts = small
    to = lambda x: torch.from_numpy(x).to(DT[dtype]).cuda()
    qg, kg, vg, cg = to(q), to(k), to(v), to(cache)
    ints = [torch.from_numpy(x).cuda() for x in (table, lens, starts)]
    out = torch.empty_like(qg)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        shim["llmc_paged_attention"](qg, kg, vg, cg, *ints, out, scale, 0, 0)  # warm-up: sizes the workspace
    st.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=st):
        shim["llmc_paged_attention"](qg, kg, vg, cg, *ints, out, scale, 0, 0)
    big = _case(2, [1] * 16, [4000] * 16, hq, hkv, d, page, dtype)
    with torch.cuda.stream(st):
        out_big, _ = _run_gpu(shim, big, dtype, scale, 0)
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = _reference()(q, k, v, cache.copy(), table, lens, starts, scale, 0)
    assert rel_err(out.float().cpu(), torch.from_numpy(ref)) < 1e-2


# ------------------------------------------------------------- packed q | k | v, rotary in the call
def _rope(x, cos, sin):
    """Rotate-half rotary embedding of x [..., T, D] by tables [T, D] (Llama / GPT-NeoX)."""
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], axis=-1) * sin


# float pages: both dtypes, tables of the dtype, float32 or none, mixed and decode steps; an int8 cache: bf16
_ROPE_CASES = [(dt, tb, st, None) for dt in ("bf16", "fp16") for tb in ("same", "f32", None) for st in ("mixed", "decode")] \
    + [("bf16", tb, "decode", "int8") for tb in ("same", None)]


@pytest.mark.parametrize("d,hq,hkv", [(64, 32, 8), (128, 8, 8), (32, 12, 4), (64, 40, 2)])
@pytest.mark.parametrize("dtype,tables,steps,codec", _ROPE_CASES)
def test_paged_attention_packed_rope_matches_reference(shim, dtype, d, hq, hkv, tables, steps, codec):
    """llmc_paged_attention(_rope) over one packed [1, T, H + 2 Hkv, D] QKV tensor (layout bit 64):
    q and k rotated in the call by cos / sin tables of q's dtype or float32 (the decode kernel in
    registers, the other paths through a rotated copy), against the reference attention of the
    rotated q and k; the appended K rows are the rotated keys (to a rounding of the dtype)."""
    from llmc.runtime.engine.kv_codec import CODEC_IDS, encode

    lens_new, lens_old = ([19, 5, 1, 1, 33], [0, 40, 3, 100, 16]) if steps == "mixed" else \
        ([1] * 6, [0, 1, 16, 700, 3000, 77])
    case = _case(d + hq + len(lens_old), lens_new, lens_old, hq, hkv, d, 16, dtype)
    _, _, _, cache, table, lens, starts = case
    T = sum(lens_new)
    rng = np.random.default_rng(T + d)
    rnd = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(DT[dtype]).float().numpy()
    X = rnd(rng.standard_normal((1, T, hq + 2 * hkv, d)).astype(np.float32))
    pos = np.concatenate([np.arange(o, o + n) for o, n in zip(lens_old, lens_new)])
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([pos[:, None] * inv[None]] * 2, axis=1)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    if tables == "same":
        cos, sin = rnd(cos), rnd(sin)
    heads = lambda lo, hi: np.ascontiguousarray(X[0, :, lo:hi].transpose(1, 0, 2))[None]  # [1, heads, T, D]
    q, k, v = heads(0, hq), heads(hq, hq + hkv), heads(hq + hkv, hq + 2 * hkv)
    if tables:
        q, k = _rope(q, cos, sin), rnd(_rope(k, cos, sin))  # the pages hold the dtype's rotated keys
    scale = 1 / math.sqrt(d)
    want_cache = cache.copy() if codec is None else encode(cache, codec)
    got_cache = torch.from_numpy(want_cache.copy()).cuda() if codec else torch.from_numpy(cache).to(DT[dtype]).cuda()
    ref = _reference()(q, k, v, want_cache, table, lens, starts, scale, 0, **({"codec": codec} if codec else {}))
    ints = [torch.from_numpy(x).cuda() for x in (table, lens, starts)]
    xg = torch.from_numpy(X).to(DT[dtype]).cuda()
    out = torch.full((1, T, hq, d), float("nan"), dtype=DT[dtype], device="cuda")
    layout = 15 | 64 | (16 * CODEC_IDS.index(codec) if codec else 0)
    if tables:
        tab = lambda t: torch.from_numpy(t).to(torch.float32 if tables == "f32" else DT[dtype]).cuda()
        shim["llmc_paged_attention_rope"](xg, xg, xg, got_cache, *ints, out, tab(cos), tab(sin), scale, 0, layout)
    else:
        shim["llmc_paged_attention"](xg, xg, xg, got_cache, *ints, out, scale, 0, layout)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    assert rel_err(out.transpose(1, 2).float().cpu(), torch.from_numpy(ref)) < (2e-2 if codec else 1e-2)
    got = got_cache.cpu()
    if codec is None:
        got = got.float().numpy()
        np.testing.assert_array_equal(got[:, 1], want_cache[:, 1])  # V pages: a copy
        np.testing.assert_allclose(got[:, 0], want_cache[:, 0], rtol=2 ** -7, atol=1e-6)  # K: one rounding apart
    else:
        assert (got.numpy() != want_cache).mean() < 1e-3  # codes of the rotated keys (a rounding may differ)


def test_paged_attention_rope_bad_tables_raise(shim):
    x = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16, device="cuda")  # H 4, Hkv 2, 2 tokens
    cache = torch.zeros(4, 2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    ints = [torch.zeros(1, 2, dtype=torch.int32, device="cuda"), torch.tensor([2], dtype=torch.int32, device="cuda"),
            torch.tensor([0, 2], dtype=torch.int32, device="cuda")]
    out = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
    bad = torch.zeros(2, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="rotary tables"):
        shim["llmc_paged_attention_rope"](x, x, x, cache, *ints, out, bad, bad, 0.1, 0, 15 | 64)
    with pytest.raises(ValueError, match="packed"):
        shim["llmc_paged_attention"](x, x, x, cache, *ints, out, 0.1, 0, 64)
