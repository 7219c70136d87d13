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
