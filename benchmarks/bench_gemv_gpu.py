"""Decode-shaped GEMMs (M = 1..16 rows) of the Llama-3.2-1B shape: llmc's shim GEMM (cuBLASLt)
against torch (cuBLAS) in the same process, as weight bytes read per second and as a fraction
of the copy bandwidth measured here.

    python benchmarks/bench_gemv_gpu.py [--shim gpu_art/gen/shim.so]
    python benchmarks/bench_gemv_gpu.py --quant [--rows 1 4 8]   # llmc_qgemv int8 / int4 against bf16
    python benchmarks/bench_gemv_gpu.py --tensor-cores --rows 1 16 512 4096   # fp8, w8a8, 2:4, int4 vs bf16
    python benchmarks/bench_gemv_gpu.py --fused --rows 1 2 4 8 16   # the decode GEMV, norm / SwiGLU fused in
    python benchmarks/bench_gemv_gpu.py --quant --fused --rows 1 2   # the same fusions, int8 / int4 vs bf16

--fused times, on W stored [N, K] (the CUDA build's layout), llmc's decode GEMV (llmc_gemm_ex at
<= 8 rows) and llmc_gemm_fused (RMSNorm -> GEMM -> SwiGLU in one call, as a Llama layer's QKV and
gate/up run) against the same work as separate launches: the shim's norm kernel, torch's cuBLAS
matmul, torch's silu * mul; and sums a decode step's matmuls both ways.

--quant times the weight-only quantized GEMV (llmc_qgemv: int8 per channel, int4 g128) against
the shim's bf16 GEMM on the same shapes, and sums a Llama-3.2-1B decode step's matmuls (16 layers
x 4 + the LM head) for each scheme. With --fused too, every scheme runs the step's fused calls
(norm + QKV, O projection + residual, norm + gate/up + SwiGLU, down + residual, norm + LM head):
llmc_gemm_fused / llmc_gemm_ex for bf16 ([N, K] weights), llmc_qgemv_fused for int8 / int4.

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
    ap.add_argument("--quant", action="store_true", help="llmc_qgemv int8 / int4 against the bf16 GEMM")
    ap.add_argument("--tensor-cores", action="store_true",
                    help="tensor-core routes against the bf16 GEMM at prefill and decode rows: fp8, w8a8, "
                         "2:4 sparse, int4 dequantize + GEMM")
    ap.add_argument("--fused", action="store_true",
                    help="the decode GEMV and llmc_gemm_fused against norm + cuBLAS + SwiGLU as separate launches")
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
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    if a.quant and a.fused:
        return quant_fused_main(shim, torch, np, bw, [m for m in a.rows if m < 64])
    if a.quant:
        return quant_main(shim, torch, np, bw, [m for m in a.rows if m < 64])
    if a.tensor_cores:
        return tensor_core_main(shim, torch, np, a.rows)
    if a.fused:
        return fused_main(shim, torch, np, bw, a.rows)
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
                out[who] = graph_time_us(torch, np, [lambda w=w: call(w) for w in ws])  # us per call
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


def graph_time_us(torch, np, calls) -> float:
    """Median time per call of a CUDA graph of `calls` (closures), 5 replays."""
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        for c in calls:
            c()
    st.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=st):
        for c in calls:
            c()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    times = []
    for _ in range(5):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / len(calls))
    return float(np.median(times)) * 1e3


FUSED_PLAN = [  # name, K, N, RMSNorm before, SwiGLU after, matmuls of this shape per decode step
    ("qkv", 2048, 3072, True, False, 16), ("o_proj", 2048, 2048, False, False, 16),
    ("gate_up", 2048, 16384, True, True, 16), ("down", 8192, 2048, False, False, 16),
    ("lm_head", 2048, 128256, False, False, 1),
]


def fused_main(shim, torch, np, bw: float, rows: list[int]) -> None:
    gemm, fused, norm = shim["llmc_gemm_ex"], shim["llmc_gemm_fused"], shim["llmc_norm_ext"]
    silu = torch.nn.functional.silu
    step = {m: {"llmc": 0.0, "split": 0.0} for m in rows}
    out = []
    for name, K, N, has_norm, glu, per_step in FUSED_PLAN:
        nbytes = K * N * 2
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 64
              for _ in range(max(2, int(np.ceil(200e6 / nbytes))))]
        g = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
        n_out = N // 2 if glu else N
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            xn = torch.empty(m, K, device="cuda", dtype=torch.bfloat16)
            h = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
            y2 = torch.empty_like(y)

            def llmc_call(w):
                if has_norm or glu:
                    fused(x, g if has_norm else None, w, None, None, y, int(glu), 1e-5)
                else:
                    gemm(x, w, None, None, y, 1, 0)

            def split_call(w):
                a = x
                if has_norm:
                    norm(x, g, None, xn, 1e-5, 1)
                    a = xn
                if glu:
                    torch.matmul(a, w.T, out=h)
                    torch.mul(silu(h[:, :n_out]), h[:, n_out:], out=y2)
                else:
                    torch.matmul(a, w.T, out=y2)
            llmc_call(ws[0])
            split_call(ws[0])
            torch.cuda.synchronize()
            err = float((y.float() - y2.float()).norm() / y2.float().norm())
            t = {"llmc": graph_time_us(torch, np, [lambda w=w: llmc_call(w) for w in ws]),
                 "split": graph_time_us(torch, np, [lambda w=w: split_call(w) for w in ws])}
            for k in t:
                step[m][k] += per_step * t[k]
            r = {"shape": name, "K": K, "N": N, "M": m, "norm": has_norm, "glu": glu, "llmc_us": t["llmc"],
                 "split_us": t["split"], "llmc_of_copy_bw": nbytes / (t["llmc"] * 1e-6) / bw,
                 "speedup": t["split"] / t["llmc"], "rel_err_vs_split": err}
            out.append(r)
            print(f"{name:8s} M={m:2d}  llmc {t['llmc']:7.1f} us ({100 * r['llmc_of_copy_bw']:.0f}% of copy)  "
                  f"separate launches {t['split']:7.1f} us  x{r['speedup']:.2f}  err {err:.1e}", flush=True)
        del ws
    for m in rows:
        st = step[m]
        print(f"decode step matmuls (+ norms, SwiGLU), M={m}: llmc {st['llmc'] / 1e3:.3f} ms, separate "
              f"{st['split'] / 1e3:.3f} ms (x{st['split'] / st['llmc']:.2f})")
    print(json.dumps(out))


def _quant_weights(torch, np, K: int, N: int, group: int):
    """Byte sizes per scheme and enough copies of each weight (bf16 [N, K], int8 per channel,
    int4 g`group`) to cycle past L2: (sizes, w16, (q8, s8), (q4, s4))."""
    from llmc.compiler.quant_layout import pack_int4

    rng = np.random.default_rng(K + N)
    sizes = {"bf16": K * N * 2, "int8": K * N + N * 2, "int4": K * N // 2 + N * (K // group) * 2}
    copies = {k: max(2, int(np.ceil(200e6 / v))) for k, v in sizes.items()}
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies["bf16"])]
    q8 = [torch.from_numpy(rng.integers(-127, 128, (N, K), dtype=np.int8)).cuda() for _ in range(copies["int8"])]
    s8 = torch.rand(N, 1, device="cuda", dtype=torch.bfloat16) / 100
    q4 = [torch.from_numpy(pack_int4(rng.integers(0, 16, (N, K)))).cuda() for _ in range(copies["int4"])]
    s4 = torch.rand(N, K // group, device="cuda", dtype=torch.bfloat16) / 100
    return sizes, w16, (q8, s8), (q4, s4)


def _quant_row(name: str, K: int, N: int, m: int, t: dict, sizes: dict, bw: float, **extra) -> dict:
    r = {"shape": name, "K": K, "N": N, "M": m, **extra, **{f"{k}_us": v for k, v in t.items()},
         **{f"{k}_of_copy_bw": sizes[k] / (t[k] * 1e-6) / bw for k in t}}
    print(f"{name:8s} M={m}  bf16 {t['bf16']:7.1f} us ({100 * r['bf16_of_copy_bw']:.0f}% of copy)  "
          f"int8 {t['int8']:7.1f} us ({100 * r['int8_of_copy_bw']:.0f}%, x{t['bf16'] / t['int8']:.2f})  "
          f"int4 {t['int4']:7.1f} us ({100 * r['int4_of_copy_bw']:.0f}%, x{t['bf16'] / t['int4']:.2f})", flush=True)
    return r


def quant_main(shim, torch, np, bw: float, rows: list[int]) -> None:
    gemm, qgemv = shim["llmc_gemm_ex"], shim["llmc_qgemv"]
    group = 128
    per_step = {"qkv": 16, "o_proj": 16, "gate_up": 16, "down": 16, "lm_head": 1}
    step = {m: {"bf16": 0.0, "int8": 0.0, "int4": 0.0} for m in rows}
    out = []
    for name, K, N, _ in SHAPES:
        sizes, w16, (q8, s8), (q4, s4) = _quant_weights(torch, np, K, N, group)
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": graph_time_us(torch, np, [lambda w=w: gemm(x, w, None, None, y, 1, 0) for w in w16]),
                 "int8": graph_time_us(torch, np, [lambda w=w: qgemv(x, w, s8, None, y, 8, K) for w in q8]),
                 "int4": graph_time_us(torch, np, [lambda w=w: qgemv(x, w, s4, None, y, 4, group) for w in q4])}
            for k in t:
                step[m][k] += per_step[name] * t[k]
            out.append(_quant_row(name, K, N, m, t, sizes, bw))
        del w16, q8, q4
    _quant_step_summary(step, group, "matmuls")
    print(json.dumps(out))


def _quant_step_summary(step: dict, group: int, what: str) -> None:
    for m, st in step.items():
        print(f"decode step {what}, M={m}: bf16 {st['bf16'] / 1e3:.3f} ms, int8 {st['int8'] / 1e3:.3f} ms "
              f"(x{st['bf16'] / st['int8']:.2f}), int4 g{group} {st['int4'] / 1e3:.3f} ms (x{st['bf16'] / st['int4']:.2f})")


def quant_fused_main(shim, torch, np, bw: float, rows: list[int]) -> None:
    fused, gemm, qfused = shim["llmc_gemm_fused"], shim["llmc_gemm_ex"], shim["llmc_qgemv_fused"]
    group = 128
    step = {m: {"bf16": 0.0, "int8": 0.0, "int4": 0.0} for m in rows}
    out = []
    for name, K, N, has_norm, glu, per_step in FUSED_PLAN:
        sizes, w16, (q8, s8), (q4, s4) = _quant_weights(torch, np, K, N, group)
        g = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16) if has_norm else None
        residual = not has_norm and not glu and name != "lm_head"  # o_proj, down: + the residual stream
        n_out = N // 2 if glu else N
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(m, n_out, device="cuda", dtype=torch.bfloat16) if residual else None
            y = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)

            def bf16(w):
                if has_norm or glu:
                    fused(x, g, w, None, res, y, int(glu), 1e-5)
                else:
                    gemm(x, w, None, res, y, 1, 0)
            t = {"bf16": graph_time_us(torch, np, [lambda w=w: bf16(w) for w in w16]),
                 "int8": graph_time_us(torch, np, [lambda w=w: qfused(x, g, w, s8, None, res, y, 8, K, int(glu), 1e-5)
                                                   for w in q8]),
                 "int4": graph_time_us(torch, np, [lambda w=w: qfused(x, g, w, s4, None, res, y, 4, group, int(glu),
                                                                      1e-5) for w in q4])}
            for k in t:
                step[m][k] += per_step * t[k]
            out.append(_quant_row(name, K, N, m, t, sizes, bw, norm=has_norm, glu=glu, residual=residual))
        del w16, q8, q4
    _quant_step_summary(step, group, "fused calls")
    print(json.dumps(out))


def tensor_core_main(shim, torch, np, rows: list[int]) -> None:
    """Per Llama-3.2-1B matmul shape and row count M: the bf16 cuBLASLt GEMM against llmc's
    tensor-core routes on the same shape: fp8 e4m3 and w8a8 int8 (llmc_qgemm_a8: the row
    quantization pass + cuBLASLt), 2:4 sparse bf16 (llmc_gemm_sparse24: cuSPARSELt), int4 g128
    weight-only (llmc_qgemv; from 64 rows dequantize + cuBLASLt). Weights cycled past L2."""
    from llmc.compiler.quant_layout import pack_int4
    from llmc.passes.sparsify import magnitude_24

    gemm, a8, sp, qgemv = shim["llmc_gemm_ex"], shim["llmc_qgemm_a8"], shim["llmc_gemm_sparse24"], shim["llmc_qgemv"]
    out = []
    for name, K, N, _ in SHAPES[:4]:
        rng = np.random.default_rng(K + N)
        copies = max(2, int(np.ceil(200e6 / (K * N * 2))))
        w16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        w24 = [torch.from_numpy(magnitude_24(rng.standard_normal((N, K)).astype(np.float32) / 64)).to(
            torch.bfloat16).cuda() for _ in range(copies)]
        q8 = [torch.from_numpy(rng.integers(-127, 128, (N, K), dtype=np.int8)).cuda() for _ in range(copies)]
        f8 = [torch.from_numpy(rng.integers(0, 0x7E, (N, K), dtype=np.uint8)).cuda() for _ in range(copies)]
        s1 = torch.rand(N, 1, device="cuda", dtype=torch.bfloat16) / 100
        q4 = [torch.from_numpy(pack_int4(rng.integers(0, 16, (N, K)))).cuda() for _ in range(copies)]
        s4 = torch.rand(N, K // 128, device="cuda", dtype=torch.bfloat16) / 100
        for m in rows:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
            routes = {"bf16": [lambda w=w: gemm(x, w, None, None, y, 1, 0) for w in w16],
                      "fp8": [lambda w=w: a8(x, w, s1, None, None, y, 1, 1e-6, 448.0) for w in f8],
                      "w8a8": [lambda w=w: a8(x, w, s1, None, None, y, 0, 1e-6, 127.0) for w in q8],
                      "sparse24": [lambda w=w: sp(x, w, None, None, y, 1) for w in w24],
                      "int4": [lambda w=w: qgemv(x, w, s4, None, y, 4, 128) for w in q4]}
            t = {}
            for k, calls in routes.items():
                try:
                    t[k] = graph_time_us(torch, np, calls)
                except Exception as e:  # noqa: BLE001 - a route this GPU or library lacks: say so, go on
                    print(f"{name} M={m} {k}: {str(e).splitlines()[-1][:160]}", flush=True)
                    t[k] = float("nan")
            r = {"shape": name, "K": K, "N": N, "M": m, **{f"{k}_us": v for k, v in t.items()},
                 "bf16_TFLOPs": 2 * m * K * N / (t["bf16"] * 1e-6) / 1e12}
            out.append(r)
            print(f"{name:8s} M={m:5d}  bf16 {t['bf16']:8.1f} us ({r['bf16_TFLOPs']:.0f} TFLOP/s)  "
                  + "  ".join(f"{k} {t[k]:8.1f} us x{t['bf16'] / t[k]:.2f}" for k in t if k != "bf16"), flush=True)
        del w16, w24, q8, f8, q4
    print(shim["llmc_qgemm_stats"]())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
