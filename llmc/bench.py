"""`llmc bench ARTIFACT --model SPEC`: an artifact on the GPU against the same model in torch
(eager and torch.compile), in one process and one run, with the ceilings measured there too.

Timing: CUDA events around `iters` back-to-back runs after warm-up, inputs already on the
device, no L2 flush (both sides alike); llmc replays its CUDA graph. A perf artifact compiled
with `--weights none` gets random weights on the device (latency does not depend on their
values); its outputs are then not comparable with torch's and no accuracy is claimed.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

import numpy as np

from .errors import LLMCError

DEFAULT_MODES = ("eager", "max-autotune-no-cudagraphs", "reduce-overhead")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def load_spec(spec: str, batch: int, seq: int):
    """(model, args, kwargs) on the GPU for `pkg.module:function` (see llmc.bench_models)."""
    os.environ["LLMC_BENCH_DEVICE"] = "cuda"
    os.environ["LLMC_BENCH_BATCH"] = str(batch)
    os.environ["LLMC_BENCH_SEQ"] = str(seq)
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise LLMCError(f"--model expects pkg.module:function (e.g. llmc.bench_models:llama_1b), got {spec!r}")
    out = getattr(importlib.import_module(mod_name), fn_name)()
    model, args = out[0], tuple(out[1])
    kwargs = dict(out[2]) if len(out) > 2 and out[2] else {}
    return model, args, kwargs


def _time_cuda(fn, iters: int, warmup: int = 3) -> float:
    """Mean ms per call of fn() over `iters` calls, with torch's CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def _time_graph(fn, iters: int = 20) -> float:
    """Mean ms per call of fn() replayed from a CUDA graph of `iters` calls (no launch overhead:
    the fair reference for kernels of a few microseconds, which llmc also replays)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    return _time_cuda(g.replay, 5, warmup=2) / iters


def ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16 GEMM's rate."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _time_cuda(lambda: y.copy_(x), 20)
    bw = 2 * x.numel() / (ms * 1e-3)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms_g = _time_cuda(lambda: a @ b, 10)
    return {"copy_TBps": bw / 1e12, "gemm_TFLOPs": 2 * n ** 3 / (ms_g * 1e-3) / 1e12}


def _shape(dims, env) -> tuple[int, ...]:
    from .runtime.manifest import eval_dim

    return tuple(eval_dim(d, env) for d in dims)


def call_costs(manifest, env: dict) -> list[dict]:
    """Per call: route, and for shim calls the GEMM (M, N, K) or attention shape and FLOPs.
    `manifest`: a runtime.manifest.Manifest."""
    out = []
    for c in manifest.program.calls:
        k = manifest.program.kernels[c.kernel]
        item = {"kernel": c.kernel, "route": k.route, "flops": 0.0, "label": k.label or k.ops}
        if k.route == "shim" and k.func == "llmc_gemm_ex":
            a, w = (_shape(t.shape, env) for t in k.tensors[:2])
            m = int(np.prod(a[:-1]))
            n, kk = w if k.scalars[0] else w[::-1]  # trans_b: W is [N, K]
            item.update(kind="gemm", mnk=(m, n, kk), flops=2.0 * m * n * kk)
        elif k.route == "shim" and k.func == "llmc_attention_ext":
            layout = k.scalars[2]
            q = _shape(k.tensors[0].shape, env)
            o = _shape(k.tensors[4].shape, env)
            B, S, D = (q[0], q[1], q[3]) if layout & 1 else (q[0], q[2], q[3])
            H = o[2] if layout & 8 else o[1]
            if layout & 16:  # packed qkv: keys are the same tokens
                T = S
            else:
                kv = _shape(k.tensors[1].shape, env)
                T = kv[1] if layout & 2 else kv[2]
            pairs = S * T if not k.scalars[1] else sum(min(T, i + 1 + T - S) for i in range(S))
            item.update(kind="attention", flops=4.0 * B * H * pairs * D)
        elif k.route == "shim":
            item.update(kind="norm")
        else:
            item.update(kind="tvm")
        out.append(item)
    return out


def _fill_random(ex) -> str:
    """Random device weights for a perf artifact: torch (fast) or the executor's host fill."""
    import torch

    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        for t in ex.device_tensors(omitted_only=True).values():
            tt = torch.from_dlpack(t)
            if tt.is_floating_point():
                tt.normal_(0.0, 0.02, generator=g)
            else:
                tt.zero_()
        return "random (torch, on the device)"
    except Exception as e:  # noqa: BLE001
        _say(f"torch could not fill the weights through DLPack ({e}); filling from the host")
        ex.fill_random_weights()
        return "random (host)"


def run_bench(artifact: str, spec: str, batch: int, seq: int, modes=DEFAULT_MODES, iters: int = 50,
              profile: bool = True, check: bool = True) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise LLMCError("llmc bench needs a CUDA GPU")
    from .runtime.executor import load
    from .runtime.artifact_files import read_manifest

    import pathlib

    manifest = read_manifest(pathlib.Path(artifact))
    omitted = bool(manifest.weights.omitted)  # a perf artifact: large weights left out
    res: dict = {"artifact": artifact, "model": spec, "batch": batch, "seq": seq,
                 "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "target": manifest.target}
    t = time.perf_counter()
    ex = load(artifact, device="cuda", fill_weights="none" if omitted else "random")
    res["weights"] = _fill_random(ex) if omitted else "from the artifact"
    res["load_s"] = time.perf_counter() - t
    _say(f"loaded {artifact} in {res['load_s']:.1f}s; weights: {res['weights']}")

    model, args, kwargs = load_spec(spec, batch, seq)
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    feed = {name: tensors[name].cpu().numpy() for name in ex.input_names}
    outs = ex.run(**feed)  # first call: plan, eager warm-up, graph capture
    res["graph"] = ex.graph_state(**feed)
    env = ex._bind(ex._arrays((), feed))
    res["env"] = env

    # llmc: graph replays between events on the executor's stream
    from .runtime.cuda_graph import EventTimer

    for _ in range(3):
        ex.replay(**feed)
    ex.synchronize()
    timer = EventTimer(ex.stream)
    with timer:
        for _ in range(iters):
            ex.replay(**feed)
    res["llmc_ms"] = timer.ms / iters
    _say(f"llmc {res['llmc_ms']:.3f} ms ({res['graph']})")

    with torch.no_grad():
        ref = None
        times = {}
        compile_s = {}
        for mode in modes:
            if mode == "eager":
                fn = model
            else:
                torch._dynamo.reset()
                fn = torch.compile(model, mode=None if mode == "default" else mode)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            compile_s[mode] = time.perf_counter() - t
            if mode == "eager":
                ref = out
            times[mode] = _time_cuda(lambda: fn(*args, **kwargs), iters)
            _say(f"torch {mode}: {times[mode]:.3f} ms (first call {compile_s[mode]:.1f}s)")
        res["torch_ms"] = times
        res["torch_first_call_s"] = compile_s
    compiled = {m: v for m, v in times.items() if m != "eager"}
    if compiled:
        best = min(compiled, key=compiled.get)
        res["best_compile_mode"] = best
        res["ratio_vs_compile"] = res["llmc_ms"] / compiled[best]
    if "eager" in times:
        res["ratio_vs_eager"] = res["llmc_ms"] / times["eager"]

    if check and not omitted and ref is not None:  # same weights only when the artifact carries them
        r0 = (ref[0] if isinstance(ref, tuple) else getattr(ref, "logits", None))
        if r0 is None and hasattr(ref, "last_hidden_state"):
            r0 = ref.last_hidden_state
        if r0 is not None:
            r = r0.float().cpu().numpy()
            g = outs[0].astype(np.float32)
            res["rel_err_vs_eager"] = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))

    res["ceilings"] = ceilings()
    costs = call_costs(manifest, env)
    flops = sum(c["flops"] for c in costs)
    wbytes = sum(int(np.prod(b.shape)) * {"bfloat16": 2, "float16": 2, "float32": 4}.get(b.dtype, 1)
                 for b in manifest.program.buffers if b.role == "weight")
    res["model_TFLOPs"] = flops / (res["llmc_ms"] * 1e-3) / 1e12
    res["weight_GB"] = wbytes / 1e9
    res["weight_read_TBps"] = wbytes / (res["llmc_ms"] * 1e-3) / 1e12
    if profile:
        res["profile"] = profile_breakdown(ex, feed, costs)
    return res


def profile_breakdown(ex, feed: dict, costs: list[dict]) -> dict:
    """Per-kernel times (eager launches between events) grouped by route, plus the cuBLAS
    rate on the same GEMM shapes (torch.matmul, same dtype, replayed from a CUDA graph)."""
    import torch

    prof = ex.profile(**feed)
    by_kind: dict = {}
    for c, (_, ms) in zip(costs, prof):
        d = by_kind.setdefault(c["kind"], {"ms": 0.0, "flops": 0.0, "calls": 0})
        d["ms"] += ms
        d["flops"] += c["flops"]
        d["calls"] += 1
    for d in by_kind.values():
        d["TFLOPs"] = d["flops"] / (d["ms"] * 1e-3) / 1e12 if d["ms"] > 0 and d["flops"] else 0.0
    out: dict = {"by_kind": by_kind, "sum_ms": sum(ms for _, ms in prof)}
    gemms: dict = {}
    for c, (_, ms) in zip(costs, prof):
        if c["kind"] == "gemm":
            g = gemms.setdefault(c["mnk"], {"llmc_ms": 0.0, "calls": 0})
            g["llmc_ms"] += ms
            g["calls"] += 1
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        next((b.dtype for b in ex.manifest.program.buffers if b.role == "weight" and b.dtype != "int64"),
             "bfloat16"), torch.bfloat16)
    torch_total = 0.0
    rows = []
    for (m, n, k), g in gemms.items():
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(k, n, device="cuda", dtype=dtype)
        c = torch.empty(m, n, device="cuda", dtype=dtype)
        ms = _time_graph(lambda: torch.matmul(a, w, out=c), 20)
        torch_total += ms * g["calls"]
        rows.append({"M": m, "N": n, "K": k, "calls": g["calls"], "llmc_ms_per_call": g["llmc_ms"] / g["calls"],
                     "cublas_ms": ms, "llmc_TFLOPs": 2 * m * n * k / (g["llmc_ms"] / g["calls"] * 1e-3) / 1e12,
                     "cublas_TFLOPs": 2 * m * n * k / (ms * 1e-3) / 1e12})
    if gemms:
        llmc_total = sum(g["llmc_ms"] for g in gemms.values())
        out["gemm_vs_cublas"] = torch_total / llmc_total if llmc_total else 0.0
        out["gemms"] = rows
    slowest: dict = {}
    for c, (name, ms) in zip(costs, prof):
        s = slowest.setdefault(name, {"ms": 0.0, "calls": 0, "route": c["route"], "label": c["label"]})
        s["ms"] += ms
        s["calls"] += 1
    out["kernels"] = dict(sorted(slowest.items(), key=lambda kv: -kv[1]["ms"]))
    return out


def format_result(r: dict) -> str:
    lines = [f"llmc bench: {r['model']} batch {r['batch']} x seq {r['seq']} on {r['device']} "
             f"(torch {r['torch']}, {r['date']}); artifact {r['artifact']} [{r['target']}]",
             f"weights: {r['weights']}" + ("  -- PERF ARTIFACT: random weights, outputs not compared"
                                          if r["weights"].startswith("random") else ""),
             f"CUDA graph: {r['graph']}", "",
             f"{'run':34s} {'ms':>9s} {'llmc / it':>10s}",
             f"{'llmc':34s} {r['llmc_ms']:9.3f} {1.0:10.2f}"]
    for mode, ms in r["torch_ms"].items():
        lines.append(f"{'torch ' + mode:34s} {ms:9.3f} {r['llmc_ms'] / ms:10.2f}")
    if "ratio_vs_compile" in r:
        lines.append(f"\nllmc / torch.compile (best mode: {r['best_compile_mode']}): {r['ratio_vs_compile']:.3f}")
    if "rel_err_vs_eager" in r:
        lines.append(f"relative error of output 0 vs torch eager: {r['rel_err_vs_eager']:.2e}")
    c = r["ceilings"]
    lines.append(f"ceilings measured now: copy {c['copy_TBps']:.2f} TB/s (read+write), bf16 GEMM 8192^3 "
                 f"{c['gemm_TFLOPs']:.0f} TFLOP/s")
    lines.append(f"achieved: {r['model_TFLOPs']:.0f} TFLOP/s over the whole run "
                 f"({100 * r['model_TFLOPs'] / c['gemm_TFLOPs']:.0f}% of the GEMM ceiling); weight reads "
                 f"{r['weight_GB']:.2f} GB -> {r['weight_read_TBps']:.2f} TB/s "
                 f"({100 * r['weight_read_TBps'] / c['copy_TBps']:.0f}% of copy bandwidth)")
    p = r.get("profile")
    if p:
        lines.append(f"\nper-kernel profile (eager launches, sum {p['sum_ms']:.3f} ms):")
        for kind, d in sorted(p["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
            lines.append(f"  {kind:10s} {d['ms']:8.3f} ms  {d['calls']:4d} calls"
                         + (f"  {d['TFLOPs']:6.0f} TFLOP/s" if d["TFLOPs"] else ""))
        if "gemm_vs_cublas" in p:
            lines.append(f"  GEMMs at {100 * p['gemm_vs_cublas']:.0f}% of cuBLAS's rate (torch.matmul, same shapes)")
        lines.append("  slowest kernels:")
        for name, s in list(p["kernels"].items())[:8]:
            lines.append(f"    {name:16s} {s['route']:4s} x{s['calls']:<3d} {s['ms']:8.3f} ms  {s['label'][:60]}")
    return "\n".join(lines)


def main_bench(a) -> int:
    modes = tuple(m for m in a.modes.split(",") if m)
    r = run_bench(a.artifact, a.model, a.batch, a.seq, modes, a.iters, profile=not a.no_profile)
    print(format_result(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    return 0
