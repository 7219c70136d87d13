"""Kernel-by-kernel GPU profile of an llmc artifact and of torch.compile on the same model.

    python3 benchmarks/profile_gpu.py gpu_art/perf/minilm.llmc --model llmc.bench_models:minilm_shape \
        --batch 32 --seq 128 [--modes reduce-overhead]

CUPTI (through torch.profiler) times every kernel inside llmc's replayed CUDA graph and inside
torch.compile's run, so small kernels are measured without the launch gaps that per-kernel
CUDA events add. Prints, per side, the kernel time per forward and the kernels that take it.
Needs a CUDA GPU, torch, and the artifact's runtime (see docs/gpu.md).
"""
from __future__ import annotations

import argparse
import collections
import pathlib


def kernel_table(prof, label: str, iters: int, top: int = 25) -> str:
    import torch

    agg: dict = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name][0] += e.device_time
            agg[e.name][1] += 1
    total = sum(t for t, _ in agg.values())
    count = sum(c for _, c in agg.values())
    lines = [f"== {label}: kernel time per forward {total / iters:.1f} us, {count / iters:.0f} kernels"]
    for name, (t, c) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {t / iters:8.1f} us  x{c / iters:5.1f}  {t / c:7.2f} us/call  {name[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--model", required=True, help="the torch side: a pkg.module:function spec")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--modes", default="reduce-overhead", help="comma-separated torch.compile modes")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmc.bench import _fill_random, load_spec
    from llmc.runtime.executor import load
    from llmc.runtime.manifest import read_manifest

    omitted = bool(read_manifest(pathlib.Path(a.artifact)).weights.omitted)
    ex = load(a.artifact, device="cuda", fill_weights="none" if omitted else "random")
    if omitted:
        _fill_random(ex)
    model, args, kwargs = load_spec(a.model, a.batch, a.seq)
    feed = {n: kwargs[n].cpu().numpy() for n in ex.input_names}
    ex.run(**feed)  # plan + graph capture
    for _ in range(5):
        ex.replay(**feed)
    ex.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(a.iters):
            ex.replay(**feed)
        ex.synchronize()
    print(kernel_table(p, "llmc (CUDA graph replay)", a.iters), flush=True)
    with torch.no_grad():
        for mode in (m for m in a.modes.split(",") if m):
            torch._dynamo.reset()
            fn = torch.compile(model, mode=mode)
            for _ in range(5):
                fn(*args, **kwargs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(a.iters):
                    fn(*args, **kwargs)
                torch.cuda.synchronize()
            print(kernel_table(p, f"torch.compile {mode}", a.iters), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
