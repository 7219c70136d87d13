"""Data-parallel serving throughput: `llmc serve ART` (DP=1, the single server) against
`llmc serve ART --dp K` (K replicas, one GPU each, behind the front's least-outstanding-
tokens router), the same requests, the same client, in one run on one machine.

    python3 benchmarks/serve_dp_gpu.py ART [--dp 1 2 4] [--num-prompts 800] [--rate inf]

ART: a CUDA generation artifact, e.g. of the Llama-3.2-1B shape (as benchmarks/serve_gpu.py):
    llmc compile llmc.bench_models:llama_1b -o ART --target cuda:sm_90 --weights none --batch 1 \\
        --seq-len 2048 --generate --max-step-tokens 2048 --max-seqs 128

Requests: ShareGPT-like lengths (llmc/bench_serve.py), fixed-length outputs (ignore_eos), all
sent at once by default (--rate inf: every configuration saturated, so output tok/s is its
capacity), streamed through llmc bench-serve's client. Printed per configuration: output and
request throughput, TTFT / TPOT p50 / p99, and the front's CPU use, as a share of one core and
in ms per output token (a single Python process relays every token: if DP=K falls short of
K x DP=1 with the front near 100%, the front is the limit); then each DP=K's output tok/s over
DP=1's. The GPU machine has aiohttp and uvloop; carry wheels of fastapi, uvicorn and httpx
as for benchmarks/serve_gpu.py. Issue 14's goal: DP=2 >= 1.8x DP=1.
The DP values default to 1, 2 and, with 4 GPUs visible, 4. Keep NCCL_NVLS_ENABLE=0 on shared
hosts (nothing here uses NCCL; replicas share no memory).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from serve_gpu import URL, Server, brief, log  # noqa: E402  (the single-server harness, reused)

from llmc.bench_serve import run_load, sharegpt_like, summarize  # noqa: E402


def visible_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return min(n, len([x for x in cvd.split(",") if x.strip()])) if cvd else n


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(art: str, dp: int, flags: list[str], work, warm, rate: float, seed: int) -> dict:
    srv = Server(art, *(["--dp", str(dp)] if dp > 1 else []), *flags)
    try:
        asyncio.run(run_load(URL, "m", warm, float("inf"), None, {}, np.random.default_rng(0)))  # graphs, shapes
        cpu0, t0 = cpu_seconds(srv.proc.pid), time.perf_counter()
        results, dur, _, delta = asyncio.run(run_load(URL, "m", work, rate, None, {}, np.random.default_rng(seed)))
        cpu = cpu_seconds(srv.proc.pid) - cpu0
        wall = time.perf_counter() - t0
    finally:
        srv.stop()
    res = summarize(results, dur, {})
    # DP=1: the server process itself (engine included); DP>1: the front alone (replicas not counted)
    res["server_cpu_fraction"] = cpu / wall
    res["server_cpu_ms_per_output_token"] = 1000 * cpu / max(1, sum(len(t.token_times) for t in results))
    res["server_counters"] = {k.removeprefix("llmc_"): v for k, v in delta.items() if v}
    return res


def main() -> None:
    from llmc.runtime.artifact_files import read_manifest

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("art")
    ap.add_argument("--dp", type=int, nargs="+", help="replica counts to measure (default 1, 2 and 4 if 4 GPUs)")
    ap.add_argument("--num-prompts", type=int, default=800)
    ap.add_argument("--rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: all at once)")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="per replica")
    ap.add_argument("--json", help="write every summary here")
    a = ap.parse_args()
    gen = read_manifest(pathlib.Path(a.art)).generation
    dps = a.dp or ([1, 2, 4] if visible_gpus() >= 4 else [1, 2])
    if dps[0] != 1:
        dps = [1] + dps  # the baseline, measured in the same run
    work = sharegpt_like(a.num_prompts, gen.max_context, gen.vocab, np.random.default_rng(7))
    log(f"{len(work)} requests: prompts mean {np.mean([len(p) for p, _ in work]):.0f}, outputs mean "
        f"{np.mean([o for _, o in work]):.0f} tokens (sum {sum(o for _, o in work)}); DP {dps}; "
        f"{visible_gpus()} GPUs visible")
    out = {}
    for dp in dps:
        warm = sharegpt_like(32 * dp, gen.max_context, gen.vocab, np.random.default_rng(8))
        r = run_one(a.art, dp, ["--max-num-seqs", str(a.max_num_seqs)], work, warm, a.rate, 11)
        out[f"dp{dp}"] = r
        brief(f"DP={dp} (server/front CPU {100 * r['server_cpu_fraction']:.0f}%, "
              f"{r['server_cpu_ms_per_output_token']:.3f} ms/token)", r)
        if r["completed"] != r["requests"]:
            log(f"DP={dp}: {r['requests'] - r['completed']} requests did not complete "
                f"({r['rejected_429']} got 429, {r['failed']} failed)")
    base = out["dp1"]["output_token_throughput"]
    for dp in dps[1:]:
        t = out[f"dp{dp}"]["output_token_throughput"]
        print(f"DP={dp}: {t:.0f} output tok/s vs DP=1 {base:.0f} = {t / base:.2f}x "
              f"(ideal {dp}.00x; goal for DP=2: >= 1.80x)", flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
