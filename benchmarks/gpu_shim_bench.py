"""Benchmark the llmc CUDA shim against torch on the GPU machine.

    python benchmarks/gpu_shim_bench.py [--shim build/cuda_shim/libllmc_shim.so] [--quick]

1. GEMM (bf16, Llama-3.2-1B prefill shapes): llmc_gemm_nt (W [N,K], nn.Linear layout) vs
   torch.nn.functional.linear, and llmc_gemm (B [K,N]) vs torch.matmul; TFLOP/s = 2MNK / t.
2. Attention (bf16, B in {1, 8}, S = T = 512, Hq 32, Hk 8, D 64, plus a few larger shapes):
   llmc_attention vs torch SDPA with the flash backend; TFLOP/s = 4 * D * (visible q-k pairs)
   * B * Hq / t (causal counts only the pairs under the diagonal).
3. CUDA graph: 100 TVM kernel launches eager vs one graph replay (runtime/cuda_graph.py).
Times are medians of triton.testing.do_bench (L2 flushed before each call). A JSON copy of the
results goes to $OUT/gpu_shim_bench.json when OUT is set.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import(name):
    try:
        return importlib.import_module(f"llmc.{name}")
    except ImportError:
        return importlib.import_module(name)


def bench(fn, quick=False):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")  # ms


def gemm_section(shim, torch, quick):
    F = torch.nn.functional
    rows = []
    Ms = [512, 4096]
    KN = [(2048, 3072, "qkv"), (2048, 2048, "o_proj"), (2048, 16384, "gate_up"), (8192, 2048, "down"),
          (2048, 128256, "lm_head")]
    for M in Ms:
        for K, N, name in KN:
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)
            c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            f_nt = shim["llmc_gemm_nt"]
            f_nt(a, w, c)
            torch.cuda.synchronize()
            err = ((c.float() - F.linear(a, w).float()).norm() / F.linear(a, w).float().norm()).item()
            t_shim = bench(lambda: f_nt(a, w, c), quick)
            t_torch = bench(lambda: F.linear(a, w), quick)
            flop = 2.0 * M * N * K
            row = dict(name=name, M=M, K=K, N=N, layout="NT", shim_ms=t_shim, torch_ms=t_torch,
                       shim_tflops=flop / t_shim / 1e9, torch_tflops=flop / t_torch / 1e9, rel_err=err)
            if not quick and N <= 16384:
                b = w.t().contiguous()  # [K, N]
                f_nn = shim["llmc_gemm"]
                t_nn = bench(lambda: f_nn(a, b, c), quick)
                t_mm = bench(lambda: torch.matmul(a, b), quick)
                row.update(nn_shim_tflops=flop / t_nn / 1e9, nn_torch_tflops=flop / t_mm / 1e9)
                del b
            rows.append(row)
            del a, w, c
            torch.cuda.empty_cache()
    return rows


def attention_section(shim, torch, quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    rows = []
    cases = [(1, 32, 8, 512, 64), (8, 32, 8, 512, 64)]
    if not quick:
        cases += [(1, 32, 8, 2048, 64), (8, 32, 8, 512, 128), (1, 32, 8, 4096, 128)]
    for B, Hq, Hk, S, D in cases:
        for causal in (1, 0):
            q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, Hk, S, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, Hk, S, D, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            scale = 1.0 / math.sqrt(D)
            f = shim["llmc_attention"]
            f(q, k, v, out, scale, causal)
            kx, vx = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
            gqa_native = True
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale, enable_gqa=True)
                torch_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale,
                                                                  enable_gqa=True)
            except RuntimeError:
                gqa_native = False
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, kx, vx, is_causal=bool(causal), scale=scale)
                torch_fn = lambda: F.scaled_dot_product_attention(q, kx, vx, is_causal=bool(causal), scale=scale)
            torch.cuda.synchronize()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_shim = bench(lambda: f(q, k, v, out, scale, causal), quick)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t_torch = bench(torch_fn, quick)
            pairs = S * (S + 1) / 2 if causal else S * S
            flop = 4.0 * B * Hq * D * pairs
            variants = {}
            for var in ("1", "2"):  # tile configs, see llmc_attention.cu
                os.environ["LLMC_ATTN_VARIANT"] = var
                out.fill_(float("nan"))
                f(q, k, v, out, scale, causal)
                torch.cuda.synchronize()
                e = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                variants[var] = dict(tflops=flop / bench(lambda: f(q, k, v, out, scale, causal), quick) / 1e9, err=e)
            os.environ.pop("LLMC_ATTN_VARIANT")
            rows.append(dict(B=B, Hq=Hq, Hk=Hk, S=S, D=D, causal=causal, shim_ms=t_shim, torch_ms=t_torch,
                             shim_tflops=flop / t_shim / 1e9, torch_tflops=flop / t_torch / 1e9, rel_err=err,
                             torch_gqa_native=gqa_native, variants=variants))
            del q, k, v, out, kx, vx
    return rows


def graph_section(tvm, cg, kernels_path):
    import numpy as np

    if not pathlib.Path(kernels_path).exists():
        return {"skipped": f"{kernels_path} missing"}
    add_one = tvm.runtime.load_module(str(kernels_path))["add_one"]
    dev = tvm.cuda(0)
    x = tvm.runtime.tensor(np.zeros(1024, "float32"), dev)
    y = tvm.runtime.empty((1024,), "float32", dev)

    def step():
        for _ in range(50):
            add_one(x, y)
            add_one(y, x)

    g = cg.CudaGraph(0)
    g.capture(step, warmup=3)
    timer = cg.EventTimer(g.stream)
    eager, replay, host = [], [], []
    for _ in range(50):
        with g.stream.use(), timer:
            step()
        eager.append(timer.ms)
        t0 = time.perf_counter()
        with timer:
            g.replay()
        host.append((time.perf_counter() - t0) * 1e3)
        replay.append(timer.ms)
    e, r = float(np.median(eager)), float(np.median(replay))
    return {"launches": 100, "eager_us": e * 1e3, "replay_us": r * 1e3, "speedup": e / r,
            "replay_wall_us": float(np.median(host)) * 1e3, "graph_nodes": g.num_nodes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shim", default=str(ROOT / "build" / "cuda_shim" / "libllmc_shim.so"))
    ap.add_argument("--tvm-kernels", default=str(ROOT / "build" / "cuda_shim" / "tvm_kernels.so"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="gemm,attention,graph")
    a = ap.parse_args()

    import torch

    tvm = _import("runtime.tvm_runtime").import_tvm(with_gpu=True)
    build = _import("backends.cuda.build_shim")
    cg = _import("runtime.cuda_graph")
    shim_path = a.shim if os.path.exists(a.shim) else str(build.build_shim())
    build.preload_cublaslt()
    shim = tvm.runtime.load_module(shim_path)
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "|", shim["llmc_shim_info"]())
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    only = set(a.only.split(","))
    if "gemm" in only:
        res["gemm"] = gemm_section(shim, torch, a.quick)
        print("\nGEMM bf16 (C = A @ W^T, W [N,K]); TFLOP/s; ratio = shim / torch")
        print(f"{'name':8s} {'M':>5s} {'K':>5s} {'N':>6s} {'shim':>7s} {'torch':>7s} {'ratio':>6s}  {'NN shim/torch':>14s} {'err':>8s}")
        for r in res["gemm"]:
            nn = (f"{r['nn_shim_tflops']:.0f}/{r['nn_torch_tflops']:.0f}" if "nn_shim_tflops" in r else "-")
            print(f"{r['name']:8s} {r['M']:5d} {r['K']:5d} {r['N']:6d} {r['shim_tflops']:7.1f} {r['torch_tflops']:7.1f} "
                  f"{r['shim_tflops'] / r['torch_tflops']:6.2f}  {nn:>14s} {r['rel_err']:8.1e}")
    if "attention" in only:
        res["attention"] = attention_section(shim, torch, a.quick)
        print("\nAttention bf16 [B,H,S,D], S = T; TFLOP/s; ratio = shim / torch SDPA(flash)")
        print(f"{'B':>2s} {'Hq':>3s} {'Hk':>3s} {'S':>5s} {'D':>4s} {'causal':>6s} {'shim_us':>8s} {'torch_us':>8s} "
              f"{'shim':>6s} {'torch':>6s} {'ratio':>6s} {'err':>8s}  variants (TFLOP/s)")
        for r in res["attention"]:
            print(f"{r['B']:2d} {r['Hq']:3d} {r['Hk']:3d} {r['S']:5d} {r['D']:4d} {r['causal']:6d} {r['shim_ms'] * 1e3:8.1f} "
                  f"{r['torch_ms'] * 1e3:8.1f} {r['shim_tflops']:6.1f} {r['torch_tflops']:6.1f} "
                  f"{r['shim_tflops'] / r['torch_tflops']:6.2f} {r['rel_err']:8.1e}  "
                  + " ".join(f"v{k}={x['tflops']:.0f}({x['err']:.0e})" for k, x in r["variants"].items()))
    if "graph" in only:
        res["graph"] = graph_section(tvm, cg, a.tvm_kernels)
        print("\nCUDA graph (100 TVM kernel launches):", json.dumps(res["graph"]))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_shim_bench.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
