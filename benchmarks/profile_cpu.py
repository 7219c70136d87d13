"""Kernel-by-kernel CPU profile of llmc on GPT-2 124M (random weights): where a forward's time goes.

    python benchmarks/profile_cpu.py [--batch 1] [--seq 128] [--reps 5] [--numpy-blas] [--settle 0.2]

Times every call of the executor back to back (after 2 warm-up forwards): per kernel, the total
ms per forward, the number of calls and, for GEMMs, the GFLOP/s. `--numpy-blas` sends the GEMMs
to numpy's BLAS instead of llmc's CPU GEMM (the same compiled kernels otherwise).
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch
import transformers

import llmc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--numpy-blas", action="store_true")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds idle before each timed forward (bench_cpu.py idles 0.2 s)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="sdpa")).eval()
    example = {"input_ids": torch.randint(0, 50257, (2, 16)), "use_cache": False}
    cm = llmc.compile(model, (), example, dim_bounds={"batch": (1, 4), "seq": (1, 256)})
    ex = cm._runner()
    if a.numpy_blas:
        from bench_cpu import numpy_blas_runner

        ex = numpy_blas_runner(cm)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 50257, (a.batch, a.seq))}
    total: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    flops: dict = {}

    def timed(call):
        fn, ids, syms, name, lib = call
        if lib is not None:
            def run_lib(args, env, lib=lib, name=name):
                t = time.perf_counter()
                lib(args, env)
                total[name] += time.perf_counter() - t
                calls[name] += 1
                if hasattr(lib, "trans_b") and name not in flops:  # a GEMM: 2 M N K
                    w, x = args[lib.args[1]], args[lib.args[0]]
                    flops[name] = 2 * x.size * (w.shape[0] if lib.trans_b else w.shape[1])
            return fn, ids, syms, name, run_lib

        def run_tvm(*args, fn=fn, name=name):
            t = time.perf_counter()
            fn(*args)
            total[name] += time.perf_counter() - t
            calls[name] += 1
        return run_tvm, ids, syms, name, None

    ex._calls = [timed(c) for c in ex._calls]
    for _ in range(2):
        ex(**feeds)
    total.clear()
    calls.clear()
    wall = 0.0
    for _ in range(a.reps):
        time.sleep(a.settle)
        t = time.perf_counter()
        ex(**feeds)
        wall += (time.perf_counter() - t) / a.reps * 1e3
    labels = {k: v.get("label", v.get("ops", "")) for k, v in cm.manifest["program"]["kernels"].items()}
    print(f"GPT-2 {a.batch} x {a.seq}, GEMMs in {'numpy BLAS' if a.numpy_blas else 'llmc CPU GEMM'}: "
          f"{wall:.1f} ms per forward, kernels {sum(total.values()) / a.reps * 1e3:.1f} ms")
    for name, secs in sorted(total.items(), key=lambda kv: -kv[1]):
        ms = secs / a.reps * 1e3
        rate = f", {flops[name] * calls[name] / a.reps / ms / 1e6:.0f} GFLOP/s" if name in flops else ""
        print(f"  {ms:8.2f} ms  x{calls[name] // a.reps:3d}  {name}: {labels.get(name, '')[:70]}{rate}")


if __name__ == "__main__":
    main()
