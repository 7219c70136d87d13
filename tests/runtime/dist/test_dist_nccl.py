"""NcclComm: without a GPU, only what fails clearly (a missing libnccl, a missing CUDA runtime);
on the GPU machine (@pytest.mark.gpu), collectives on 2+ GPUs against numpy, on host arrays,
on torch's device pointers, inside a torch CUDA graph and inside the runtime's own CudaGraph."""
import os

import numpy as np
import pytest

from llmc.runtime.dist import NcclError
from llmc.runtime.dist import nccl as nccl_mod

from dist_ranks import launch_workers
from dist_workers import data


def test_missing_libnccl_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nccl_mod, "_nccl", None)
    monkeypatch.setattr(nccl_mod, "_candidates", lambda: ["/nonexistent/libnccl.so.2"])
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    with pytest.raises(NcclError, match="nvidia-nccl-cu13"):
        nccl_mod.load_nccl()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # set before any NCCL code could read it


def test_nvls_setting_of_the_user_is_kept(monkeypatch):
    monkeypatch.setattr(nccl_mod, "_nccl", None)
    monkeypatch.setattr(nccl_mod, "_candidates", lambda: [])
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    with pytest.raises(NcclError):
        nccl_mod.load_nccl()
    assert os.environ["NCCL_NVLS_ENABLE"] == "1"


def test_no_cuda_runtime_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from llmc.runtime.dist import DistEnv, NcclComm

    with pytest.raises(NcclError):  # no libnccl, or no CUDA runtime / driver: named, not a crash
        NcclComm.create(DistEnv.single())


def _gpus() -> int:
    torch = pytest.importorskip("torch")
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4])
def test_nccl_collectives_match_numpy(tmp_path, n):
    if _gpus() < n:
        pytest.skip(f"needs {n} GPUs")
    seed = int(np.random.default_rng().integers(1 << 30))
    result, _, err = launch_workers("nccl", n, tmp_path, seed, timeout=300)
    assert result.ok, result.report() + err[-4000:]
    got = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]
    f64 = lambda k, shape, dt="float32": [data(seed + k, r, shape, dt).astype(np.float64) for r in range(n)]
    want_ar = sum(f64(0, (1000, 3)))
    want_ag = np.concatenate(f64(1, (4, 6)))
    # bf16 inputs: rank r's float32 data rounded to bf16, summed by NCCL in bf16
    import torch

    bf = [torch.from_numpy(x.astype(np.float32)).bfloat16().float().numpy().astype(np.float64) for x in f64(2, (4096,))]
    want_bf = sum(bf)
    fp16 = np.concatenate([x.astype(np.float16).astype(np.float64) for x in f64(3, (5, 7))])
    for r in range(n):
        g = got[r]
        np.testing.assert_allclose(g["host_all_reduce"], want_ar, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g["host_all_gather"], want_ag.astype(np.float32))
        np.testing.assert_allclose(g["dev_all_reduce_bf16"], want_bf, rtol=2e-2, atol=5e-2 * n)
        np.testing.assert_array_equal(g["dev_all_gather_f16"], fp16)
        for step in range(3):
            want = sum(x + 1 for x in f64(10 + step, (256,)))
            np.testing.assert_allclose(g[f"graph_step{step}"], want, rtol=1e-5, atol=1e-5)
        for step in range(2):
            np.testing.assert_allclose(g[f"runtime_graph_step{step}"], sum(f64(20 + step, (512,))), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g["dev_ring_int64"], data(seed + 4, (r - 1) % n, (33,), "int64"))
        if r < 2:
            np.testing.assert_array_equal(g["sub_sum"], np.full(3, 3.0, np.float32))
        np.testing.assert_array_equal(g["dev_all_reduce_bf16"], got[0]["dev_all_reduce_bf16"])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4])
def test_oneshot_allreduce_matches_numpy_and_is_the_same_on_every_rank(tmp_path, n):
    """runtime/dist/oneshot.py with the shim's kernel (LLMC_SHIM_LIB): sums of fresh random data
    against float64 numpy, identical bits on every rank, eager and replayed from a CUDA graph."""
    if _gpus() < n:
        pytest.skip(f"needs {n} GPUs")
    if not os.environ.get("LLMC_SHIM_LIB"):
        pytest.skip("needs LLMC_SHIM_LIB, a shim built with llmc_allreduce.cu")
    import torch

    seed = int(np.random.default_rng().integers(1 << 30))
    result, _, err = launch_workers("oneshot", n, tmp_path, seed, timeout=300)
    assert result.ok, result.report() + err[-4000:]
    got = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]

    def rounded(k, shape, dt):  # each rank's input as the GPU saw it
        return [torch.from_numpy(data(seed + k, r, shape, "float32")).to(dt).double().numpy() for r in range(n)]

    cases = [((4096,), torch.bfloat16, 1e-2), ((16, 4096), torch.bfloat16, 1e-2), ((6, 40), torch.float16, 2e-3),
             ((65536,), torch.float32, 1e-6), ((3, 128), torch.float32, 1e-6)]
    for k, (shape, dt, tol) in enumerate(cases):
        want = sum(rounded(k, shape, dt))
        for r in range(n):
            np.testing.assert_allclose(got[r][f"out{k}"], want, rtol=tol, atol=tol * n)
            np.testing.assert_array_equal(got[r][f"out{k}"], got[0][f"out{k}"])
            np.testing.assert_array_equal(got[r][f"inplace{k}"], got[r][f"out{k}"])
    for step in range(4):
        x = sum(rounded(30 + step, (8192,), torch.bfloat16))
        x = torch.from_numpy(x).bfloat16().double().numpy()
        want = n * torch.from_numpy(2 * x).bfloat16().double().numpy()
        for r in range(n):
            np.testing.assert_allclose(got[r][f"graph{step}"], want, rtol=2e-2, atol=2e-2 * n)
            np.testing.assert_array_equal(got[r][f"graph{step}"], got[0][f"graph{step}"])


def test_oneshot_is_refused_alike_on_every_rank_for_a_missing_kernel_or_several_hosts():
    """The one-shot set-up's verdict from what the ranks published (host | device | IPC handle):
    a rank without the kernel (an older shim) or ranks on two hosts keep NCCL everywhere."""
    from llmc.runtime.dist.oneshot import _why_not

    handle = b"\x00" * 64
    same = [b"host-a|0|" + handle, b"host-a|1|" + handle]
    assert "no one-shot kernel" in _why_not([same[0], b""], None, 0, 0)
    assert "several hosts" in _why_not([same[0], b"host-b|1|" + handle], None, 0, 0)
