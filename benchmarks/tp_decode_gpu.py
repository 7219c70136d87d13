"""Tensor-parallel decode step on 1, 2 and 4 GPUs: one process per GPU (llmc's launcher), each
rank replaying its step function's CUDA graph with NCCL all-reduces inside.

Build host (no GPU; perf artifacts, weights filled with random values on each GPU):

    LLMC_BENCH_LAYERS=8 llmc compile llmc.bench_models:llama_8b -o gpu_art/tp/l8b_tp2 --tp 2 \
        --target cuda:sm_90 --weights none --batch 1 --seq-len 1024 --generate --max-step-tokens 256 --max-seqs 16
    (and --tp 1 -o gpu_art/tp/l8b_tp1, --tp 4 -o gpu_art/tp/l8b_tp4)

GPU machine (2 or 4 GPUs):

    python benchmarks/tp_decode_gpu.py gpu_art/tp/l8b_tp1 gpu_art/tp/l8b_tp2 gpu_art/tp/l8b_tp4 --json tp.json

Per artifact: the decode step at batch B and context C (token ids and page metadata copied in,
the graph replayed, synchronized; median over the timed steps), its time against TP=1's, and
from one eagerly launched step timed kernel by kernel with events: the all-reduces' share and
their bus bandwidth (nccl-tests' busbw = bytes * 2(n-1)/n / time) against an all-reduce of the
same message alone, through the same NcclComm, in a CUDA-graph-free loop of 200.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode_gpu (PYTHONSAFEPATH-proof)


def _alone_allreduce_us(comm, nbytes: int, iters: int = 200) -> float:
    import torch

    x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    for _ in range(20):
        comm.all_reduce_device(x.data_ptr(), x.numel(), "bfloat16", stream)
    torch.cuda.synchronize()
    comm.barrier()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(iters):
        comm.all_reduce_device(x.data_ptr(), x.numel(), "bfloat16", stream)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3


def worker(a: argparse.Namespace) -> None:
    from bench_decode_gpu import _zero_pool, decode_profile, llmc_decode

    from llmc.runtime.executor import load
    from llmc.runtime.tp_run import join

    art = pathlib.Path(a.worker)
    tp = _tp_of(art)
    if tp > 1:
        env, comm, path = join(art, "cuda")
    else:
        env, comm, path = None, None, art / "rank0" if (art / "rank0").exists() else art
    llm = load(path, device="cuda:0", comm=comm, kv_memory=a.kv_memory)
    _zero_pool(llm)
    rng = np.random.default_rng(0)  # the same token ids on every rank
    out = {"tp": tp}
    for batch in a.batch:
        res = llmc_decode(llm, batch, a.context, a.steps, rng)
        prof = decode_profile(llm, batch, a.context, rng)
        total = sum(t for _, _, t in prof)
        coll = [(k, n, t) for k, n, t in prof if "all-reduce" in k]
        row = {"step_ms": res["step_ms"], "replay_ms": res["replay_ms"], "eager_total_ms": total}
        if coll:
            n_ar = sum(n for _, n, _ in coll)
            t_ar = sum(t for _, _, t in coll) / n_ar * 1e3
            nbytes = a.hidden * batch * 2  # one all-reduce: the [tokens, hidden] bf16 residual update
            alone = _alone_allreduce_us(comm, nbytes)
            factor = 2 * (tp - 1) / tp
            row.update({"allreduce_calls": n_ar, "allreduce_us": t_ar, "allreduce_share": sum(t for _, _, t in coll) / total,
                        "allreduce_bytes": nbytes, "busbw_GBps": nbytes * factor / (t_ar * 1e-6) / 1e9,
                        "alone_us": alone, "alone_busbw_GBps": nbytes * factor / (alone * 1e-6) / 1e9})
        out[f"b{batch}"] = row
    if env is None or env.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    if comm is not None:
        from llmc.runtime.tp_run import leave

        leave(comm)  # os._exit: ncclCommDestroy would wait on the captured graphs


def _tp_of(art: pathlib.Path) -> int:
    from llmc.runtime.tp_run import artifact_tp

    return artifact_tp(art)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arts", nargs="*")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--kv-memory", type=int, default=2 << 30)
    p.add_argument("--json")
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    from llmc.runtime.dist.launch import launch

    results = []
    for art in a.arts:
        tp = _tp_of(pathlib.Path(art))
        argv = [sys.executable, os.path.abspath(__file__), "--worker", art, "--context", str(a.context), "--steps",
                str(a.steps), "--hidden", str(a.hidden), "--kv-memory", str(a.kv_memory), "--batch", *map(str, a.batch)]
        out, err = io.StringIO(), io.StringIO()
        t = time.perf_counter()
        res = launch(argv, tp, devices=list(range(tp)), stdout=out, stderr=err, timeout=400, label=False, check=False)
        line = next((ln for ln in out.getvalue().splitlines() if ln.startswith("RESULT ")), None)
        if not res.ok or line is None:
            print(f"[tp_decode] {art}: failed\n{res.report()}\n{err.getvalue()[-3000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        r["art"] = art
        results.append(r)
        print(f"[tp_decode] {art}: {json.dumps(r)} ({time.perf_counter() - t:.0f} s)", flush=True)
    base = next((r for r in results if r["tp"] == 1), None)
    print(f"\n| TP | batch | step ms | vs TP=1 | all-reduces | us each | share of step | busbw GB/s | alone us | alone busbw | in-step / alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for b in a.batch:
            row = r.get(f"b{b}")
            if row is None:
                continue
            ratio = "" if base is None else f"{row['step_ms'] / base[f'b{b}']['step_ms']:.3f}x"
            ar = [f"{row[k]:.3g}" if k in row else "-" for k in ("allreduce_calls", "allreduce_us", "allreduce_share",
                                                                  "busbw_GBps", "alone_us", "alone_busbw_GBps")]
            eff = f"{row['alone_us'] / row['allreduce_us']:.2f}" if "alone_us" in row else "-"
            print(f"| {r['tp']} | {b} | {row['step_ms']:.3f} | {ratio} | " + " | ".join(ar) + f" | {eff} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
