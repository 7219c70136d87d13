"""Pipeline-parallel generation throughput on GPUs: the whole model on one GPU against its
`--pp M` stages on M GPUs (one process each, NCCL send/recv of the residual stream inside each
stage's CUDA graphs, the last stage's logits broadcast), the same prompts, in one run.

Build host (no GPU; weights filled with random values on each GPU):

    llmc compile llmc.bench_models:llama_1b -o gpu_art/pp/pp1 --target cuda:sm_90 --weights none \\
        --batch 1 --seq-len 1024 --generate --max-step-tokens 256 --max-seqs 16
    (and --pp 2 -o gpu_art/pp/pp2)

GPU machine:

    python benchmarks/pp_generate_gpu.py gpu_art/pp/pp1 gpu_art/pp/pp2 [--batch 1 16 32] [--new 128] [--micro-batches 1 2]

Per artifact and batch: `generate` of B prompts of --prompt-len random tokens, --new tokens each
(greedy, no stop tokens), once to warm up (graphs captured), then timed: output tokens/s and ms
per decode step (the loop's wall time over its steps, host work included). A PP artifact runs once
per --micro-batches setting: 1 is the stages in lockstep (each GPU holds 1/M of the layers and
waits while the others work); G > 1 deals the prompts into G groups with a step of each in flight
(runtime/engine/pp_loop.py), so stage 1 runs group 1 while stage 2 runs group 0.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # rank_results (PYTHONSAFEPATH-proof)


def worker(a: argparse.Namespace) -> None:
    from llmc.runtime.artifact_files import read_manifest
    from llmc.runtime.executor import load
    from llmc.runtime.tp_run import join, leave, rank_path

    art = pathlib.Path(a.worker)
    stages = read_manifest(rank_path(art, 0)).parallel
    tokens = None
    if stages is not None:
        from llmc.runtime.dist.host_comm import HostComm
        from llmc.runtime.engine.pp_step import PipelineStep

        env, comm, path = join(art, "cuda")
        llm = load(path, device=f"cuda:{comm.device}", comm=comm, kv_memory=a.kv_memory)
        par = read_manifest(path).parallel
        tokens = HostComm.create(env, name="pp_tokens")
        inner = llm.step
        rank, pp, settings = env.rank, par.pp, a.micro_batches
    else:
        comm, rank, pp, settings = None, 0, 1, [1]
        llm = load(art, device="cuda:0", kv_memory=a.kv_memory)
    out = {"pp": pp, "rows": []}
    for mb in settings:
        if tokens is not None:
            llm.step = PipelineStep(inner, comm, par.stage, par.pp, llm.spec.vocab, root=(par.pp - 1) * par.tp,
                                    tokens=tokens, micro_batches=mb)
        for batch in a.batch:
            rng = np.random.default_rng(batch)  # the same prompts on every stage and setting
            prompts = [rng.integers(10, llm.spec.vocab - 10, a.prompt_len).tolist() for _ in range(batch)]
            llm.generate(prompts, max_new_tokens=a.new, stop_token_ids=())  # warm-up: plans and graphs
            t = time.perf_counter()
            res = llm.generate(prompts, max_new_tokens=a.new, stop_token_ids=())
            dt = time.perf_counter() - t
            n = sum(len(r.token_ids) for r in res)
            out["rows"].append({"batch": batch, "micro_batches": mb, "tokens": n, "seconds": dt, "tok_s": n / dt,
                                "step_ms": dt / a.new * 1e3, "first": res[0].token_ids[:8]})
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    if comm is not None:
        tokens.close()
        leave(comm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arts", nargs="*")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--kv-memory", type=int, default=4 << 30)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2],
                   help="PP artifacts: steps in flight (1: the stages in lockstep)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    from llmc.runtime.artifact_files import read_manifest
    from rank_results import launch_for_result
    from llmc.runtime.tp_run import rank_path

    results = []
    for art in a.arts:
        par = read_manifest(rank_path(art, 0)).parallel
        n = 1 if par is None else par.pp * par.tp
        argv = [sys.executable, os.path.abspath(__file__), "--worker", art, "--prompt-len", str(a.prompt_len),
                "--new", str(a.new), "--kv-memory", str(a.kv_memory), "--batch", *map(str, a.batch),
                "--micro-batches", *map(str, a.micro_batches)]
        r = launch_for_result(argv, n, "pp_generate", art, timeout=500)
        if r is not None:
            results.append(r)
    base = {row["batch"]: row for r in results if r["pp"] == 1 for row in r["rows"]}
    print(f"\ngenerate: prompts of {a.prompt_len} tokens, {a.new} new each, greedy, timed after a warm-up run")
    print("| PP | GPUs | micro-batches in flight | batch | output tok/s | vs PP=1 | ms per step | same tokens as PP=1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for row in r["rows"]:
            b = base.get(row["batch"])
            ratio = "" if b is None else f"{row['tok_s'] / b['tok_s']:.3f}x"
            same = "" if b is None else ("yes" if row["first"] == b["first"] else "no")
            print(f"| {r['pp']} | {r['pp']} | {row['micro_batches']} | {row['batch']} | {row['tok_s']:.1f} | {ratio} | "
                  f"{row['step_ms']:.2f} | {same} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
