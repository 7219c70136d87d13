"""runtime/cuda_graph.py on the GPU: TVM kernels and shim calls captured in one CUDA graph and
replayed, with TVM's runtime and ctypes only (torch is not used on this path)."""
import os
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tvm_kernels(tvm_gpu):
    path = pathlib.Path(os.environ.get("LLMC_TVM_TEST_KERNELS", ROOT / "build" / "cuda_shim" / "tvm_kernels.so"))
    if not path.exists():
        pytest.skip(f"{path} missing: build it with tests/backends/cuda/make_tvm_kernels.py")
    return tvm_gpu.runtime.load_module(str(path))


def test_capture_and_replay_tvm_and_shim_calls(tvm_gpu, tvm_kernels, shim, cuda_graph_mod):
    tvm, cg = tvm_gpu, cuda_graph_mod
    dev = tvm.cuda(0)
    add_one = tvm_kernels["add_one"]
    x = tvm.runtime.tensor(np.zeros(4096, "float32"), dev)
    y = tvm.runtime.empty((4096,), "float32", dev)
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((64, 128)).astype("float16")
    w_np = (rng.standard_normal((128, 256)) / 10).astype("float16")
    a, w = tvm.runtime.tensor(a_np, dev), tvm.runtime.tensor(w_np, dev)
    c = tvm.runtime.empty((64, 256), "float16", dev)
    gemm = shim["llmc_gemm"]
    qkv_np = rng.standard_normal((3, 1, 2, 64, 64)).astype("float16")
    q, k, v = (tvm.runtime.tensor(t, dev) for t in qkv_np)
    o = tvm.runtime.empty((1, 2, 64, 64), "float16", dev)
    attention = shim["llmc_attention"]

    def step():  # 100 TVM launches (ping-pong, so every launch depends on the previous) + shim calls
        for _ in range(50):
            add_one(x, y)
            add_one(y, x)
        gemm(a, w, c)
        attention(q, k, v, o, 0.125, 1)

    g = cg.CudaGraph(0)
    g.capture(step, warmup=1)  # eager warm-up: x = 100
    assert g.num_nodes >= 102
    np.testing.assert_array_equal(x.numpy(), 100)
    for _ in range(3):
        g.replay()
    g.synchronize()
    np.testing.assert_array_equal(x.numpy(), 400)
    ref = a_np.astype(np.float64) @ w_np.astype(np.float64)
    got = c.numpy().astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
    qf, kf, vf = (t.astype(np.float64) for t in qkv_np)
    sc = qf @ kf.swapaxes(-1, -2) * 0.125
    sc = np.where(np.tril(np.ones((64, 64), bool)), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    ref_o = (p / p.sum(-1, keepdims=True)) @ vf
    got_o = o.numpy().astype(np.float64)
    assert np.linalg.norm(got_o - ref_o) / np.linalg.norm(ref_o) < 1e-2


def test_replay_is_faster_than_eager(tvm_gpu, tvm_kernels, cuda_graph_mod):
    tvm, cg = tvm_gpu, cuda_graph_mod
    dev = tvm.cuda(0)
    add_one = tvm_kernels["add_one"]
    x = tvm.runtime.tensor(np.zeros(1024, "float32"), dev)
    y = tvm.runtime.empty((1024,), "float32", dev)

    def step():
        for _ in range(50):
            add_one(x, y)
            add_one(y, x)

    g = cg.CudaGraph(0)
    g.capture(step, warmup=2)
    timer = cg.EventTimer(g.stream)
    eager, graph = [], []
    for _ in range(20):
        with g.stream.use(), timer:
            step()
        eager.append(timer.ms)
        with timer:
            g.replay()
        graph.append(timer.ms)
    e, r = float(np.median(eager)), float(np.median(graph))
    print(f"\n100 launches: eager {e * 1e3:.1f} us, graph replay {r * 1e3:.1f} us ({e / r:.1f}x)")
    assert r < e
