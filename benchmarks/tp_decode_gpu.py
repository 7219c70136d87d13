"""Tensor-parallel decode step on 1, 2 and 4 GPUs: one process per GPU (llmc's launcher), each
rank replaying its step function's CUDA graph with NCCL all-reduces inside.

Build host (no GPU; perf artifacts, weights filled with random values on each GPU):

    LLMC_BENCH_LAYERS=8 llmc compile llmc.bench_models:llama_8b -o gpu_art/tp/l8b_tp2 --tp 2 \
        --target cuda:sm_90 --weights none --batch 1 --seq-len 1024 --generate --max-step-tokens 256 --max-seqs 16
    (and --tp 1 -o gpu_art/tp/l8b_tp1, --tp 4 -o gpu_art/tp/l8b_tp4)

GPU machine (2 or 4 GPUs):

    python benchmarks/tp_decode_gpu.py gpu_art/tp/l8b_tp1 gpu_art/tp/l8b_tp2 gpu_art/tp/l8b_tp4 --json tp.json

Per artifact: the decode step at batch B and context C (token ids and page metadata copied in,
the graph replayed, synchronized; median over the timed steps), its time against TP=1's, and the
graph's replay alone. With `--allreduce auto off`, each TP > 1 artifact runs twice, the second
time with every collective a no-op: the replays' difference over the step's all-reduces (counted
in its program) is the in-step time of one, and its bus bandwidth (nccl-tests' busbw = bytes *
2(n-1)/n / time) is set against the same message all-reduced alone, through the same NcclComm
(and the one-shot kernel), in a CUDA graph. `--profile`: rank 0 prints each step's kernel table.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode_gpu (PYTHONSAFEPATH-proof)


def _graph_us(call, iters: int = 50, reps: int = 5) -> float:
    """Time of one call(stream), from a CUDA graph of `iters` calls replayed `reps` times."""
    import torch

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(5):
            call(side.cuda_stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stream = torch.cuda.current_stream().cuda_stream
        for _ in range(iters):
            call(stream)
    graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(reps):
        graph.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / (iters * reps) * 1e3


def _alone_us(comm, oneshot, nbytes: int) -> dict:
    """An all-reduce of `nbytes` bf16 alone, in a CUDA graph: NCCL's, and the one-shot kernel's."""
    import torch
    import tvm_ffi

    x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    out = {"nccl_alone_us": _graph_us(lambda st: comm.all_reduce_device(x.data_ptr(), x.numel(), "bfloat16", st))}
    if oneshot is not None and oneshot.fits(nbytes, "bfloat16"):
        y = torch.zeros_like(x)
        dev = tvm_ffi.device("cuda", torch.cuda.current_device())

        def one(st):
            with tvm_ffi.use_raw_stream(dev, st):
                oneshot(x, y)
        out["oneshot_alone_us"] = _graph_us(one)
    return out


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
    mode = a.allreduce[0]
    if mode == "off":  # timing only: every collective a no-op (wrong sums), what the step costs without them
        from llmc.runtime.gpu import GpuExecutor

        GpuExecutor._collective = lambda self, k, args: ((lambda x, y: None), tuple(args))
    device = 0 if comm is None else comm.device
    import torch

    torch.cuda.set_device(device)  # the all-reduce timings' buffers on this rank's GPU
    llm = load(path, device=f"cuda:{device}", comm=comm, kv_memory=a.kv_memory, allreduce="nccl" if mode == "off" else mode)
    _zero_pool(llm)
    rng = np.random.default_rng(0)  # the same token ids on every rank
    out = {"tp": tp, "allreduce": mode if tp > 1 else "-"}
    if tp > 1 and (env is None or env.rank == 0) and mode == "auto":
        step = llm.step.executor
        why = step.oneshot_why or "used for messages up to %d bytes" % step.oneshot.max_bytes
        print(f"[tp_decode] one-shot all-reduce: {why}", flush=True)
    program = llm.step.executor._program
    n_coll = sum(1 for c in program.calls
                 if program.kernels[c.kernel].route == "coll" and program.kernels[c.kernel].func == "all_reduce")
    for batch in a.batch:
        res = llmc_decode(llm, batch, a.context, a.steps, rng)
        row = {"step_ms": res["step_ms"], "replay_ms": res["replay_ms"]}
        if a.profile:  # every rank replays (the all-reduces need them all); rank 0 prints
            table = decode_profile(llm, batch, a.context, rng)
            if env is None or env.rank == 0:
                print(table, flush=True)
        if n_coll:
            row["allreduce_calls"] = n_coll
            row["allreduce_bytes"] = a.hidden * batch * 2  # one all-reduce: the [tokens, hidden] bf16 residual update
            if mode != "off":
                row.update(_alone_us(comm, llm.step.executor.oneshot, row["allreduce_bytes"]))
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
    p.add_argument("--allreduce", nargs="+", default=["auto", "nccl", "off"], choices=["auto", "nccl", "off"],
                   help="all-reduce paths to time at TP > 1 (auto: the one-shot kernel for small messages; "
                        "off: none at all, wrong sums, the step's cost without them)")
    p.add_argument("--profile", action="store_true", help="rank 0 prints each step's kernel table (CUPTI)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    from rank_results import launch_for_result

    results = []
    runs = [(art, mode) for art in a.arts for mode in (a.allreduce if _tp_of(pathlib.Path(art)) > 1 else ["-"])]
    for art, mode in runs:
        tp = _tp_of(pathlib.Path(art))
        argv = [sys.executable, os.path.abspath(__file__), "--worker", art, "--context", str(a.context), "--steps",
                str(a.steps), "--hidden", str(a.hidden), "--kv-memory", str(a.kv_memory), "--batch", *map(str, a.batch),
                "--allreduce", mode if mode != "-" else "auto"]
        r = launch_for_result(argv, tp, "tp_decode", art, timeout=400)
        if r is not None:
            results.append(r)
    base = next((r for r in results if r["tp"] == 1), None)
    print("\nin-step us per all-reduce = (replay with them - replay with none) / their count; bus bandwidth as "
          "nccl-tests' busbw (bytes * 2(n-1)/n / time); alone = the same message in a CUDA graph of 50")
    print("| TP | all-reduce | batch | step ms | vs TP=1 | replay ms | vs TP=1 | all-reduces | in-step us | "
          "in-step busbw GB/s | NCCL alone us | NCCL alone busbw | in-step / NCCL alone | one-shot alone us |")
    print("| --- " * 14 + "|")
    for r in results:
        for b in a.batch:
            row = r.get(f"b{b}")
            if row is None or r["allreduce"] == "off":
                continue
            ref = None if base is None else base.get(f"b{b}")
            ratio = "" if ref is None else f"{row['step_ms'] / ref['step_ms']:.3f}x"
            rratio = "" if ref is None else f"{row['replay_ms'] / ref['replay_ms']:.3f}x"
            off = next((o.get(f"b{b}") for o in results if o["tp"] == r["tp"] and o["allreduce"] == "off"), None)
            cells = ["-"] * 6
            if "allreduce_calls" in row:
                n, nbytes, factor = row["allreduce_calls"], row["allreduce_bytes"], 2 * (r["tp"] - 1) / r["tp"]
                bw = lambda us: nbytes * factor / (us * 1e-6) / 1e9
                alone = row["nccl_alone_us"]
                cells = [str(n), "-", "-", f"{alone:.1f}", f"{bw(alone):.1f}", f"{row.get('oneshot_alone_us', 0):.1f}"]
                if off is not None:
                    us = (row["replay_ms"] - off["replay_ms"]) / n * 1e3
                    row["in_step_us"] = us
                    cells[1:3] = [f"{us:.1f}", f"{bw(us):.1f}" if us > 0 else "-"]
                cells.insert(5, f"{alone / row['in_step_us']:.2f}" if row.get("in_step_us", 0) > 0 else "-")
            print(f"| {r['tp']} | {r['allreduce']} | {b} | {row['step_ms']:.3f} | {ratio} | {row['replay_ms']:.3f} | "
                  f"{rratio} | " + " | ".join(cells) + " |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
