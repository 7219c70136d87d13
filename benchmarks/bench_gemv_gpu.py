"""Decode-shaped GEMMs (M = 1..16 rows) of the Llama-3.2-1B shape: llmc's shim GEMM (cuBLASLt)
against torch (cuBLAS) in the same process, as weight bytes read per second and as a fraction
of the copy bandwidth measured here.

    python benchmarks/bench_gemv_gpu.py [--shim gpu_art/gen/shim.so]

Each timing replays a CUDA graph of calls that cycle through enough weight copies (> 2x the
L2 cache) that every call reads its weight from HBM; median of 5 replays.
"""
from __future__ import annotations

import argparse
import json

SHAPES = [  # name, K, N, weight layout (NN: [K, N] as llmc stores it; NT: [N, K], a tied LM head)
    ("qkv", 2048, 3072, "NN"), ("o_proj", 2048, 2048, "NN"), ("gate_up", 2048, 16384, "NN"),
    ("down", 8192, 2048, "NN"), ("lm_head", 2048, 128256, "NT"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shim", default="gpu_art/gen/shim.so")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    a = ap.parse_args()
    import numpy as np
    import torch

    try:
        from llmc.runtime.tvm_runtime import import_tvm
    except ImportError:
        from runtime.tvm_runtime import import_tvm
    tvm = import_tvm(with_gpu=True)
    shim = tvm.runtime.load_module(a.shim)
    gemm = shim["llmc_gemm_ex"]

    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_decode_gpu import copy_bandwidth

    bw = copy_bandwidth(torch)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for name, K, N, layout in SHAPES:
        nbytes = K * N * 2
        copies = max(2, int(np.ceil(200e6 / nbytes)))
        ws = [torch.randn((N, K) if layout == "NT" else (K, N), device="cuda", dtype=torch.bfloat16) / 64
              for _ in range(copies)]
        for m in a.rows:
            xa = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            c = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
            ref = (xa.float() @ (ws[0].float().T if layout == "NT" else ws[0].float()))
            gemm(xa, ws[0], None, None, c, int(layout == "NT"), 0)
            torch.cuda.synchronize()
            err = float((c.float() - ref).norm() / ref.norm())
            out = {}
            for who in ("llmc", "torch"):
                def call(w):
                    if who == "llmc":
                        gemm(xa, w, None, None, c, int(layout == "NT"), 0)
                    else:
                        torch.matmul(xa, w.T if layout == "NT" else w, out=c)
                st = torch.cuda.Stream()
                with torch.cuda.stream(st):
                    for w in ws:
                        call(w)
                st.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=st):
                    for w in ws:
                        call(w)
                times = []
                for _ in range(5):
                    s.record()
                    g.replay()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e) / len(ws))
                out[who] = float(np.median(times)) * 1e3  # us per call
            r = {"shape": name, "K": K, "N": N, "layout": layout, "M": m, "llmc_us": out["llmc"],
                 "torch_us": out["torch"], "llmc_TBps": nbytes / out["llmc"] / 1e6,
                 "llmc_of_copy_bw": nbytes / (out["llmc"] * 1e-6) / bw, "speedup_vs_torch": out["torch"] / out["llmc"],
                 "rel_err": err}
            rows.append(r)
            print(f"{name:8s} M={m:2d}  llmc {out['llmc']:7.1f} us ({r['llmc_TBps']:.2f} TB/s, "
                  f"{100 * r['llmc_of_copy_bw']:.0f}% of copy)  torch {out['torch']:7.1f} us  "
                  f"x{r['speedup_vs_torch']:.2f}  err {err:.1e}", flush=True)
        del ws
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
