"""llmc's CPU GEMM (backends/cpu_gemm/llmc_sgemm.cc, runtime/cpu_gemm.py): out = a @ w^T against
numpy in float64 on fresh random inputs (relative 1e-5 of the row norms' product, fp32), over
the shapes the kernel has to get right: ragged N and K, edge tiles, GEMV rows, strided rows,
one and two threads, concurrent callers; and the artifact side: a compiled model ships the
library, its GEMMs run there, and the outputs match torch eager."""
import threading

import numpy as np
import pytest
import torch

import llmc
from llmc.backends.cpu_gemm import build_gemm_library
from llmc.runtime.cpu_gemm import Sgemm

from cpu_kernels import HAS_AVX512, kernel_library, needs_avx512  # tests/helpers


@pytest.fixture(scope="module")
def sgemm() -> Sgemm:
    return kernel_library()


def _check(sgemm, m, n, k, threads=2, lda=None, seed=0):
    rng = np.random.default_rng(seed)
    a_full = rng.standard_normal((m, lda or k)).astype(np.float32)
    a = a_full[:, :k]  # rows lda apart
    w = rng.standard_normal((n, k)).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    sgemm.threads = threads
    sgemm(a, w, out)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(w, axis=1)[None, :] + 1e-30
    assert np.all(np.abs(out - ref) <= 1e-5 * scale), (m, n, k)


@needs_avx512
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 17), (4, 6, 16), (5, 7, 33), (7, 13, 100), (1, 2304, 768),
                                   (2, 50, 3072), (9, 50257 // 64, 64), (128, 101, 768), (64, 48 * 3 + 5, 31),
                                   (5, 7, 8192 * 2 + 37),  # K blocks: partial sums added into C
                                   (12, 53, 512), (15, 100, 3072), (9, 60, 8192 + 1024),  # W blocks copied
                                   # 16+ rows: A packed in panels of 64 (a last panel of 1-4 vectors of rows),
                                   # tiles of 6 weight rows (a partial last tile), K blocks of 128 (a partial
                                   # last block; partial sums kept between blocks), column blocks of 1 MB of
                                   # W rows (84 rows at K = 3000: two in a thread's chunk, the second partial),
                                   # work items of one panel at K = 3000 (a panel's packed A is 750 KB)
                                   (70, 300, 3000), (200, 50, 3000), (20, 1000, 400), (32, 12, 16), (33, 25, 1100),
                                   (100, 13, 520), (40, 7, 3), (64, 1, 512), (31, 24, 700), (129, 7, 70), (80, 6, 9), (112, 5, 40), (16, 7, 20), (15, 9, 40)])

@pytest.mark.parametrize("threads", [1, 2])
def test_matches_numpy(sgemm, m, n, k, threads):
    _check(sgemm, m, n, k, threads)


@needs_avx512
@pytest.mark.parametrize("m,n,k", [(12, 100, 1024), (12, 100, 3072), (15, 20, 3072), (31, 20, 1024), (64, 20, 1024),
                                   (70, 9, 3072), (128, 30, 768)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_the_others(sgemm, m, n, k, threads):
    """A row's result is the same bits whichever other rows share the call, within each of the two
    kernels: under 16 rows the dot-product tiles (a 3-row call; rows of W 4 KB apart are copied
    to rows that do not collide from 8 rows on, the same FMAs in the same order), from 16 rows on
    the packed panels (a 17-row call: the row sits at another place in another panel)."""
    rng = np.random.default_rng(k + m)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    sub = slice(5, 8) if m < 16 else slice(m - 17, m)
    many = np.empty((m, n), np.float32)
    few = np.empty((sub.stop - sub.start, n), np.float32)
    sgemm.threads = threads
    sgemm(a, w, many)
    sgemm(a[sub], w, few)
    assert np.array_equal(many[sub], few)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    assert np.all(np.abs(many - ref) <= 1e-5 * np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(w, axis=1))


@needs_avx512
def test_strided_rows_and_empty_k(sgemm):
    _check(sgemm, 6, 20, 40, lda=56)
    _check(sgemm, 45, 30, 40, lda=56)  # packed panels read rows lda apart too
    out = np.ones((3, 4), np.float32)
    sgemm(np.zeros((3, 0), np.float32), np.zeros((4, 0), np.float32), out)
    assert not out.any()


@needs_avx512
def test_a_packed_a_past_64_mb_then_a_small_call(sgemm):
    """The packed rows of A past 64 MB (freed after the call, not kept), then a call that needs
    a buffer again: both right."""
    _check(sgemm, 64, 3, 270_000)
    _check(sgemm, 40, 30, 100)


@needs_avx512
def test_concurrent_callers(sgemm):
    """Two Python threads at once: one gets the worker pool, the other runs alone; both right."""
    errors = []

    def work(seed):
        try:
            for i in range(5):
                _check(sgemm, 64, 300, 200, seed=seed * 10 + i)
        except AssertionError as e:
            errors.append(e)

    ts = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


@needs_avx512
def test_takes_only_what_it_reads(sgemm):
    f = np.zeros((8, 16), np.float32)
    w = np.zeros((4, 16), np.float32)
    assert sgemm.takes(f, w, np.zeros((8, 4), np.float32))
    assert sgemm.takes(f[:1], w, np.zeros((1, 4), np.float32))  # a GEMV too: the same kernel for every M
    assert not sgemm.takes(f.astype(np.float64), w.astype(np.float64), np.zeros((8, 4)))
    assert not sgemm.takes(f[:, ::2], w[:, ::2], np.zeros((8, 4), np.float32))  # columns strided
    with pytest.raises(ValueError, match="do not make"):
        sgemm(f, np.zeros((4, 8), np.float32), np.zeros((8, 4), np.float32))


def test_not_loaded_without_avx512(monkeypatch):
    import llmc.runtime.cpu_gemm as cg

    monkeypatch.setattr(cg, "host_cpu_features", lambda: frozenset({"AVX2", "FMA3"}))
    assert cg.load_sgemm(build_gemm_library()) is None
    assert cg.load_sgemm(None) is None


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(48, 200)
        self.down = torch.nn.Linear(200, 48)
        self.proj = torch.nn.Parameter(torch.randn(48, 70) * 0.1)  # x @ P: a [K, N] weight

    def forward(self, x):
        return torch.relu(self.up(x)).matmul(self.down.weight.T) @ self.proj


def test_artifact_ships_and_uses_it(tmp_path):
    torch.manual_seed(0)
    model = _MLP().eval()
    x = torch.randn(2, 9, 48)
    cm = llmc.compile(model, (x,))
    assert cm.manifest["libraries"]["roles"].get("gemm") == "gemm.so"
    routes = [k for k in cm.manifest["program"]["kernels"].values() if k.get("route") == "blas"]
    assert len(routes) == 3 and all(k["scalars"] == [1] for k in routes)  # every GEMM reads W^T
    art = cm.export(tmp_path / "mlp")
    assert (art / "gemm.so").exists()
    ex = llmc.load(art)
    gemms = [c[4] for c in ex._calls if c[4] is not None]
    assert len(gemms) == 3 and all((g.sgemm is not None) == HAS_AVX512 for g in gemms)
    xs = torch.randn(2, 9, 48)
    with torch.no_grad():
        ref = model(xs).numpy()
    np.testing.assert_allclose(ex(xs.numpy())[0], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cm(xs.numpy())[0], ref, rtol=1e-4, atol=1e-4)


@needs_avx512
def test_paged_attention_products_in_the_gemm(sgemm):
    """The CPU paged attention's prefill-sized products through llmc's GEMM give numpy's values
    (a GQA prefill of two sequences, one continuing a cached prefix), fp32, 1e-5."""
    from llmc.runtime.engine.paged_attention import GEMM_MIN_MACS, paged_attention

    rng = np.random.default_rng(7)
    h, hkv, d, page = 8, 2, 32, 16
    counts, lens = np.array([96, 80]), np.array([96, 144])  # the second sequence had 64 cached tokens
    t = int(counts.sum())
    assert 4 * 80 * 32 * 144 >= GEMM_MIN_MACS  # so the GEMM route is taken
    q = rng.standard_normal((1, h, t, d)).astype(np.float32)
    k, v = (rng.standard_normal((1, hkv, t, d)).astype(np.float32) for _ in range(2))
    cache = rng.standard_normal((24, 2, page, hkv, d)).astype(np.float32)
    table = np.array([np.arange(0, 12), np.arange(12, 24)], np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ref = paged_attention(q, k, v, cache.copy(), table, lens, starts, 0.17)
    got = paged_attention(q, k, v, cache.copy(), table, lens, starts, 0.17, sgemm=sgemm)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@needs_avx512
def test_a_forked_child_gets_a_pool_of_its_own(sgemm):
    """After fork the child has none of the parent's workers: its GEMMs still finish, right."""
    import os

    _check(sgemm, 32, 300, 64)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only when the 2-thread GEMM finished and matched
        try:
            _check(sgemm, 32, 300, 64, seed=5)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            os._exit(1)
    import time

    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:  # a hung child fails the test, not the run
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child's GEMM hung")
        time.sleep(0.05)
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0


@needs_avx512
def test_workers_left_out_of_a_call(sgemm):
    """Four threads' worth of workers, calls that use 2, 3 or 4 of them in turn: a worker left
    out of one call must run the next one's part once, with that call's job (all right, no hang)."""
    errors = []

    def work():
        try:
            sgemm.threads = 4
            for i in range(60):
                # parts = min(threads, tiles, n * k / 2^17 ...): 2, 3, 4, 1 with these sizes
                _check(sgemm, 1 + i % 7, (1100, 1600, 2600, 600)[i % 4], 256 + i % 5, threads=4, seed=i)
        except AssertionError as e:
            errors.append(e)
        finally:
            sgemm.threads = 2

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert not t.is_alive(), "a GEMM hung"
    assert not errors, errors[0]


def test_a_library_that_does_not_load_falls_back(monkeypatch, tmp_path):
    """A gemm.so this system cannot load (here: not a library at all) leaves the GEMMs to numpy,
    with a warning, instead of failing the load."""
    import llmc.runtime.cpu_gemm as cg

    monkeypatch.setattr(cg, "host_cpu_features", lambda: frozenset({"AVX512F", "AVX512VL"}))
    bad = tmp_path / "gemm.so"
    bad.write_text("not an ELF file")
    with pytest.warns(UserWarning, match="does not load here"):
        assert cg.load_sgemm(bad) is None


def test_the_library_needs_only_the_c_library():
    """Built with the C++ runtime inside (when the compiler has it), exporting its entry points and
    nothing else."""
    import os
    import subprocess

    from llmc.backends.cpu_gemm import compiler

    static = subprocess.run([compiler(), "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(static):
        pytest.skip("this compiler has no static libstdc++: the library links it dynamically")
    lib = build_gemm_library()
    needed = subprocess.run(["objdump", "-p", str(lib)], capture_output=True, text=True).stdout
    deps = [line.split()[-1] for line in needed.splitlines() if line.strip().startswith("NEEDED")]
    assert "libstdc++.so.6" not in deps, deps
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    exported = sorted(line.split()[-1] for line in syms.splitlines() if line.split()[-2] not in ("A", "U"))
    assert exported == ["llmc_attention_f32", "llmc_sgemm_nt", "llmc_sgemm_nt_packed", "llmc_sgemm_pack_w",
                        "llmc_sgemm_packed_floats", "llmc_sgemm_supported"], exported
