"""llmc's CPU GEMM from a copy of W packed once (llmc_sgemm_pack_w / llmc_sgemm_nt_packed,
runtime/cpu_gemm.py's Sgemm.weight_gemm): against numpy in float64 on fresh random inputs
(relative 1e-5 of the row norms' product, fp32) and, from 16 rows, the same bits as the kernel
that packs A per call; the runtime packs a weight once, for 256+ row calls, within its budget."""
import numpy as np
import pytest
import torch

import llmc

from llmc.backends.cpu_gemm import build_gemm_library
from llmc.runtime.cpu_gemm import load_sgemm

from cpu_kernels import HAS_AVX512, needs_avx512  # tests/helpers


@pytest.fixture(scope="module")
def sgemm():
    """Packing every weight, whatever the rows (the runtime's threshold is 256)."""
    s = load_sgemm(build_gemm_library(), pack_weights=1 << 30) if HAS_AVX512 else None
    if s is not None:
        s.PACKED_W_ROWS = 1
    return s


def _inputs(m, n, k, lda=None, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, lda or k)).astype(np.float32)[:, :k]  # rows lda apart
    w = rng.standard_normal((n, k)).astype(np.float32)
    return a, w


@needs_avx512
@pytest.mark.parametrize("m,n,k,lda", [
    (1, 5, 17, None), (3, 50, 40, 56), (15, 64, 128, None),  # few rows: tiles of 1-3 rows of A
    (16, 7, 20, None), (129, 130, 770, None),                 # ragged panels of W, a partial K block
    (256, 384, 384, 400),                                     # MiniLM's attention projections, rows strided
    (300, 70, 1100, None),                                    # one panel of W: 2 threads split A's rows
    (128, 1000, 3000, None),  # A within 2 MB: one chunk of rows, W's 16 panels in groups (block prefetch)
    (700, 64, 3000, None),    # A past 2 MB: chunks of rows; blocks of 84 rows of A at K = 3000
    (1030, 200, 40, None),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_numpy_and_the_per_call_packing(sgemm, m, n, k, lda, threads):
    a, w = _inputs(m, n, k, lda, seed=m + n + k)
    sgemm.threads = threads
    out = np.full((m, n), np.nan, np.float32)
    sgemm.weight_gemm(a, w, out)
    assert sgemm.packed_weight(w) is not None  # it ran from the packed copy
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(w, axis=1)[None, :] + 1e-30
    assert np.all(np.abs(out - ref) <= 1e-5 * scale)
    if m >= 16:  # the A-packing kernel's FMAs, in the same order: the same bits
        per_call = np.empty_like(out)
        sgemm(a, w, per_call)
        assert np.array_equal(out, per_call)


@needs_avx512
def test_a_weight_is_packed_once(sgemm):
    a, w = _inputs(300, 90, 200)
    out = np.empty((300, 90), np.float32)
    sgemm.weight_gemm(a, w, out)
    first = sgemm.packed_weight(w)
    assert first.ctypes.data % 64 == 0 and first.size == 2 * 64 * 200  # 2 panels of 64 rows, zeros past 90
    second = first[64 * 200:].reshape(200, 64)  # [k][64]: lane j is W's row 64 + j
    assert np.array_equal(second[:, :26], w[64:].T) and not second[:, 26:].any()  # rows past 90: zeros
    sgemm.weight_gemm(a, w, out)
    assert sgemm.packed_weight(w) is first  # the same copy
    other = w.copy()
    assert sgemm.packed_weight(other) is not first  # another array, another copy
    with pytest.raises(ValueError, match="do not make"):
        sgemm.weight_gemm(a, w[:, :100], out)


@needs_avx512
def test_weights_past_the_budget_are_read_in_place():
    """With room for one packed weight, the second is not packed; both products are right."""
    s = load_sgemm(build_gemm_library(), pack_weights=4 * 64 * 300)
    a, w1 = _inputs(256, 64, 300, seed=1)
    _, w2 = _inputs(256, 64, 300, seed=2)
    outs = [np.empty((256, 64), np.float32) for _ in range(2)]
    for w, out in zip((w1, w2), outs):
        s.weight_gemm(a, w, out)
        np.testing.assert_allclose(out, a @ w.T, rtol=1e-4, atol=1e-4)
    assert s.packed_weight(w1) is not None and s.packed_weight(w2) is None
    assert load_sgemm(build_gemm_library(), pack_weights=False).packs is False


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(48, 130)
        self.down = torch.nn.Linear(130, 40)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@needs_avx512
def test_an_artifact_packs_its_weights_for_long_calls_only(tmp_path):
    """Loaded with pack_weights (the default), a 300-row call packs the GEMM weights once and gives
    the same bits as a load without; a 9-row call packs nothing. Both match torch eager."""
    torch.manual_seed(0)
    model = _MLP().eval()
    cm = llmc.compile(model, (torch.randn(2, 9, 48),), dim_bounds={"seq": (1, 256)})
    art = cm.export(tmp_path / "mlp")
    packs, plain = llmc.load(art), llmc.load(art, pack_weights=False)
    with pytest.raises(llmc.LLMCError, match="pack_weights"):
        llmc.load(art, pack_weights="yes")
    gemms = [c[4] for c in packs._calls if c[4] is not None]
    assert len(gemms) == 2 and all(g.packed for g in gemms)
    assert not any(c[4].packed for c in plain._calls if c[4] is not None)
    sg = gemms[0].sgemm
    short = torch.randn(2, 9, 48)
    long = torch.randn(2, 150, 48)  # 300 rows
    with torch.no_grad():
        ref_short, ref_long = model(short).numpy(), model(long).numpy()
    np.testing.assert_allclose(packs(short.numpy())[0], ref_short, rtol=1e-4, atol=1e-4)
    assert not sg._packed
    out = packs(long.numpy())[0]
    assert len(sg._packed) == 2
    np.testing.assert_allclose(out, ref_long, rtol=1e-4, atol=1e-4)
    assert np.array_equal(out, plain(long.numpy())[0])
    assert np.array_equal(packs(long.numpy())[0], out) and len(sg._packed) == 2


@needs_avx512
def test_a_long_prompt_generates_the_same_with_packed_weights(tmp_path):
    """A generation artifact's prefill of 280 tokens (the step function's GEMMs take 280 rows, so
    they read packed weights, one copy for the forward and step executors) gives transformers'
    greedy tokens, as a load without packing does."""
    pytest.importorskip("transformers")
    from causal_lms import VOCAB, hf_greedy, tiny_causal_lm

    model = tiny_causal_lm("llama", layers=1, max_position_embeddings=512)
    cm = llmc.compile(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 6))},
                      dim_bounds={"batch": (1, 2), "seq": (1, 320)}, generate=True)
    path = cm.export(tmp_path / "g.llmc")
    prompt = torch.randint(3, VOCAB, (280,), generator=torch.Generator().manual_seed(3)).tolist()
    want = hf_greedy(model, prompt, 8)
    packs, plain = llmc.load(path), llmc.load(path, pack_weights=False)
    for llm in (packs, plain):
        assert [g.token_ids for g in llm.generate([prompt], max_new_tokens=8, stop_token_ids=())] == [want]
    shared = {id(c[4].sgemm) for ex in (packs.forward, packs.step.executor) for c in ex._calls if c[4] is not None}
    assert len(shared) == 1  # one library object, so one packed copy of each weight
    assert next(c[4] for c in packs.forward._calls if c[4] is not None).sgemm._packed  # the prefill packed
