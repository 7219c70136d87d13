"""GPU benchmark suite: `llmc bench` over the prefill targets, one process, one GPU.

Build host (no GPU; CUDA artifacts, perf artifacts without their large weights):

    llmc compile llmc.bench_models:llama_1b -o gpu_art/perf/llama1b.llmc --target cuda \
        --weights none --batch 8 --seq-len 512
    llmc compile llmc.bench_models:minilm_shape -o gpu_art/perf/minilm.llmc --target cuda \
        --weights none --batch 32 --seq-len 128

GPU machine (runtime-only TVM; see docs):

    python benchmarks/bench_gpu.py --art gpu_art/perf --out results.json [--modes ...]

Each row times the artifact (CUDA-graph replay) and the same model in torch eager and
torch.compile in the same process; weights are random (latency does not depend on their
values). Prints one `llmc bench` report per row, then a markdown summary table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

SUITE = [  # (name, artifact, model spec, batch, seq)
    ("MiniLM-shape fp16", "minilm.llmc", "llmc.bench_models:minilm_shape", 32, 128),
    ("Llama-3.2-1B-shape bf16", "llama1b.llmc", "llmc.bench_models:llama_1b", 1, 512),
    ("Llama-3.2-1B-shape bf16", "llama1b.llmc", "llmc.bench_models:llama_1b", 8, 512),
]


def summary(rows: list[dict]) -> str:
    lines = ["| model | batch x seq | llmc ms | eager ms | compile ms (mode) | llmc / compile | GEMMs vs cuBLAS | "
             "attention TFLOP/s | model TFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        t = r["torch_ms"]
        best = r.get("best_compile_mode")
        if best is None and "[" in name:  # an alternative artifact: compare with its row's baseline
            base = next((x for n, x in rows if n == name.split(" [")[0] and x["batch"] == r["batch"]
                         and x["seq"] == r["seq"]), {})
            best = base.get("best_compile_mode")
            t = base.get("torch_ms", {})
            if best:
                r = {**r, "ratio_vs_compile": r["llmc_ms"] / t[best]}
        p = r.get("profile", {})
        attn = p.get("by_kind", {}).get("attention", {}).get("TFLOPs", 0.0)
        lines.append(f"| {name} | {r['batch']} x {r['seq']} | {r['llmc_ms']:.3f} | {t.get('eager', float('nan')):.3f} | "
                     + (f"{t[best]:.3f} ({best})" if best else "-") + " | "
                     + (f"{r['ratio_vs_compile']:.2f}" if best else "-") + " | "
                     + (f"{100 * p['gemm_vs_cublas']:.0f}%" if "gemm_vs_cublas" in p else "-") + " | "
                     + f"{attn:.0f} | {r['model_TFLOPs']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from llmc.bench import DEFAULT_MODES, format_result, run_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--art", default="gpu_art/perf")
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--big-modes", help="modes for the 1B rows (default: --modes)")
    ap.add_argument("--only", help="comma-separated row indices")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--alt", default="", help="comma-separated artifact folders (e.g. other schedules) to time "
                                              "too, llmc only, next to each row")
    a = ap.parse_args(argv)
    rows = []
    for i, (name, art, spec, b, s) in enumerate(SUITE):
        if a.only and str(i) not in a.only.split(","):
            continue
        modes = (a.big_modes if "1B" in name and a.big_modes else a.modes).split(",")
        r = run_bench(str(pathlib.Path(a.art) / art), spec, b, s, tuple(m for m in modes if m), a.iters)
        print(format_result(r), flush=True)
        print(flush=True)
        rows.append((name, r))
        for alt in (x for x in a.alt.split(",") if x):
            ra = run_bench(str(pathlib.Path(alt) / art), spec, b, s, (), a.iters)
            ra["torch_ms"] = {}
            print(format_result(ra), flush=True)
            rows.append((f"{name} [{alt}]", ra))
        if a.out:
            pathlib.Path(a.out).write_text(json.dumps([{"name": n, **x} for n, x in rows], indent=1, default=str))
        import torch

        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
