"""All-reduce bus bandwidth: llmc's NcclComm (ctypes libnccl) against torch.distributed's NCCL,
one process per GPU (started by llmc's launcher), in the same run.

    python benchmarks/allreduce_gpu.py --nproc 2 [--json out.json]
    python benchmarks/allreduce_gpu.py --nproc 4 --max-bytes 256M --factor 4 --no-torch

For each message size (8 KiB .. 1 GiB, bf16, in place) both all-reduce the same buffer `iters`
times in a row on the current stream, timed with CUDA events; the time per call is the slowest
rank's, the median of --rounds rounds that alternate llmc and torch. As in nccl-tests:
algbw = bytes / time, busbw = algbw * 2 (n - 1) / n (what each link carries). The ratio is
llmc's busbw over torch's.

Decode: the all-reduce of one decode step's hidden state (--hidden, 1 x 4096 bf16 by default)
as latency, called eagerly in a loop and replayed from a CUDA graph of --graph-calls calls
(a decode step runs in a graph).

--oneshot-shim LIB adds llmc's one-shot kernel (runtime/dist/oneshot.py; messages up to
--oneshot-max-bytes): where NCCL's ring and the one-shot kernel cross over.

Before timing, every implementation sums (rank + 1) over a buffer and the result is checked.
NCCL_NVLS_ENABLE=0 (NVLink multicast off) unless set: the launcher and NcclComm both see to it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import numpy as np


def parse_bytes(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1:] in units else int(s)


def sizes(lo: int, hi: int, factor: int) -> list[int]:
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= factor
    return out


def iters_for(nbytes: int, scale: float) -> int:
    """Enough calls that a size takes ~tens of ms per round, 10 .. 500."""
    return max(10, min(500, int(scale * (8 << 30) / max(nbytes, 1))))


def busbw(nbytes: int, us: float, n: int) -> tuple[float, float]:
    alg = nbytes / (us * 1e-6) / 1e9
    return alg, alg * 2 * (n - 1) / n


# ---- worker (one per GPU) -----------------------------------------------------------------------
def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from llmc.runtime.dist import DistEnv, NcclComm, connect_store
    from llmc.runtime.dist.launch import free_port
    from llmc.runtime.dist.nccl import nccl_version

    env = DistEnv.from_environ()
    n, rank = env.world_size, env.rank
    torch.cuda.set_device(env.local_rank)
    dev = torch.device("cuda", env.local_rank)
    log = (lambda *x: print(*x, flush=True)) if rank == 0 else (lambda *x: None)
    comm = NcclComm.create(env, device=env.local_rank, timeout=120)
    log(f"NcclComm up: {n} ranks, NCCL {'.'.join(map(str, nccl_version()))}, "
        f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
    use_torch = not a.no_torch
    if use_torch:
        store = connect_store(env)
        if rank == 0:
            store.set("bench/torch_port", str(free_port(env.master_addr)).encode())
        port = int(store.get("bench/torch_port"))
        init = dict(backend="nccl", init_method=f"tcp://{env.master_addr}:{port}", rank=rank, world_size=n)
        try:
            dist.init_process_group(**init, device_id=dev)  # eager NCCL init (torch >= 2.3)
        except TypeError:
            dist.init_process_group(**init)
        log(f"torch.distributed up: torch {torch.__version__}, NCCL {torch_nccl_version(torch)}")

    def llmc_ar(t):
        comm.all_reduce_device(t.data_ptr(), t.numel(), "bfloat16", torch.cuda.current_stream().cuda_stream)

    def torch_ar(t):
        dist.all_reduce(t)

    impls = {"llmc": llmc_ar}
    if use_torch:
        impls["torch"] = torch_ar
    oneshot_max = 0
    if a.oneshot_shim:  # the shim's one-shot kernel (runtime/dist/oneshot.py) for messages it takes
        import tvm_ffi

        from llmc.runtime.dist.oneshot import OneShotAllReduce
        from llmc.runtime.gpu import import_tvm_cuda

        kernel = import_tvm_cuda().runtime.load_module(a.oneshot_shim)["llmc_allreduce_oneshot"]
        oneshot, why = OneShotAllReduce.create(comm, kernel, max_bytes=a.oneshot_max_bytes)
        if oneshot is None:
            raise SystemExit(f"one-shot all-reduce unavailable: {why}")
        oneshot_max = a.oneshot_max_bytes
        tdev = tvm_ffi.device("cuda", env.local_rank)

        def oneshot_ar(t):
            with tvm_ffi.use_raw_stream(tdev, torch.cuda.current_stream().cuda_stream):
                oneshot(t, t)
        impls["oneshot"] = oneshot_ar

    # correctness first: sum of (rank + 1) over every rank
    for name, fn in impls.items():
        numel = min(1 << 20, oneshot_max // 2) if name == "oneshot" else 1 << 20
        t = torch.full((numel,), float(rank + 1), dtype=torch.bfloat16, device=dev)
        fn(t)
        torch.cuda.synchronize()
        want = n * (n + 1) / 2
        bad = int((t.float() != want).sum())
        if bad:
            raise SystemExit(f"rank {rank}: {name} all-reduce wrong in {bad} of {t.numel()} elements")
    log("check: both sum (rank + 1) correctly" if use_torch else "check: llmc sums (rank + 1) correctly")

    def slowest(us: float) -> float:
        v = np.array([us], np.float64)
        out = np.empty(n, np.float64)
        comm.all_gather(v, out)
        return float(out.max())

    def time_calls(fn, t, iters: int) -> float:
        for _ in range(max(2, iters // 10)):
            fn(t)
        torch.cuda.synchronize()
        comm.barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn(t)
        e.record()
        e.synchronize()
        return slowest(s.elapsed_time(e) * 1e3 / iters)

    rows = []
    big = torch.zeros(a.max_bytes // 2, dtype=torch.bfloat16, device=dev)  # zeros: sums stay finite
    for nbytes in sizes(a.min_bytes, a.max_bytes, a.factor):
        t = big[: nbytes // 2]
        iters = iters_for(nbytes, a.scale)
        here = {k: f for k, f in impls.items() if k != "oneshot" or nbytes <= oneshot_max}
        times = {name: [] for name in here}
        for _ in range(a.rounds):
            for name, fn in here.items():
                times[name].append(time_calls(fn, t, iters))
        row = {"bytes": nbytes, "count": nbytes // 2, "iters": iters}
        for name in here:
            us = float(np.median(times[name]))
            alg, bus = busbw(nbytes, us, n)
            row.update({f"{name}_us": us, f"{name}_algbw_GBps": alg, f"{name}_busbw_GBps": bus})
        if use_torch:
            row["ratio"] = row["llmc_busbw_GBps"] / row["torch_busbw_GBps"]
        rows.append(row)
        log(f"{nbytes:>12d} B: " + "  ".join(f"{k} {row[k]:.3f}" for k in row if k.endswith(("_us", "busbw_GBps"))))
    del big

    # decode: one step's hidden state, eager and from a CUDA graph
    h = torch.zeros(a.hidden, dtype=torch.bfloat16, device=dev)
    decode = {"hidden": a.hidden, "bytes": a.hidden * 2}
    for name, fn in impls.items():
        decode[f"{name}_eager_us"] = float(np.median([time_calls(fn, h, 1000) for _ in range(a.rounds)]))
        try:
            decode[f"{name}_graph_us"] = graph_latency(torch, comm, fn, h, a.graph_calls, a.rounds, slowest)
        except RuntimeError as e:  # e.g. a torch build whose NCCL calls cannot be captured
            decode[f"{name}_graph_us"] = None
            decode[f"{name}_graph_error"] = str(e)[:300]
        log(f"decode {a.hidden} bf16, {name}: eager {decode[f'{name}_eager_us']:.2f} us, graph "
            f"{decode[f'{name}_graph_us']} us")

    if rank == 0:
        out = {"world_size": n, "device": torch.cuda.get_device_name(dev), "dtype": "bfloat16",
               "nccl_llmc": ".".join(map(str, nccl_version())), "torch": torch.__version__,
               "nccl_torch": torch_nccl_version(torch) if use_torch else None,
               "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "rounds": a.rounds, "rows": rows, "decode": decode,
               "oneshot": bool(oneshot_max)}
        pathlib.Path(a.result).write_text(json.dumps(out, indent=1))
    comm.barrier()
    comm.close()
    if use_torch:
        dist.destroy_process_group()


def torch_nccl_version(torch) -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def graph_latency(torch, comm, fn, h, calls: int, rounds: int, slowest) -> float:
    """us per all-reduce, `calls` of them captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph wants
        for _ in range(3):
            fn(h)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(h)
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        comm.barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            g.replay()
        e.record()
        e.synchronize()
        out.append(slowest(s.elapsed_time(e) * 1e3 / (5 * calls)))
    return float(np.median(out))


# ---- parent: launch, then print ------------------------------------------------------------------
def table(res: dict) -> str:
    n = res["world_size"]
    has_torch = res["nccl_torch"] is not None
    head = f"{'bytes':>12} {'count':>11} | {'llmc us':>9} {'algbw':>7} {'busbw':>7}"
    if has_torch:
        head += f" | {'torch us':>9} {'algbw':>7} {'busbw':>7} | {'ratio':>6}"
    lines = [f"all-reduce, bf16, {n} x {res['device']} (NCCL llmc {res['nccl_llmc']}, torch {res['torch']} NCCL "
             f"{res['nccl_torch']}, NCCL_NVLS_ENABLE={res['nvls']}); GB/s; busbw = algbw * 2(n-1)/n",
             head, "-" * len(head)]
    for r in res["rows"]:
        line = f"{r['bytes']:>12d} {r['count']:>11d} | {r['llmc_us']:>9.2f} {r['llmc_algbw_GBps']:>7.2f} " \
               f"{r['llmc_busbw_GBps']:>7.2f}"
        if has_torch:
            line += f" | {r['torch_us']:>9.2f} {r['torch_algbw_GBps']:>7.2f} {r['torch_busbw_GBps']:>7.2f} | " \
                    f"{r['ratio']:>6.3f}"
        if "oneshot_us" in r:
            line += f" | one-shot {r['oneshot_us']:>8.2f} us {r['oneshot_busbw_GBps']:>7.2f} busbw"
        lines.append(line)
    d = res["decode"]
    lines.append(f"decode step hidden state (1 x {d['hidden']} bf16, {d['bytes']} B), us per all-reduce:")
    for name in ("llmc", "torch", "oneshot"):
        if f"{name}_eager_us" not in d:
            continue
        g = d.get(f"{name}_graph_us")
        gtxt = f"{g:.2f}" if g is not None else f"n/a ({d.get(f'{name}_graph_error')})"
        lines.append(f"  {name:6s} eager {d[f'{name}_eager_us']:.2f}   in a CUDA graph {gtxt}")
    if has_torch and d.get("torch_graph_us") and d.get("llmc_graph_us"):
        lines.append(f"  graph latency ratio llmc / torch: {d['llmc_graph_us'] / d['torch_graph_us']:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="GPUs (one process each)")
    ap.add_argument("--min-bytes", type=parse_bytes, default=8 << 10)
    ap.add_argument("--max-bytes", type=parse_bytes, default=1 << 30)
    ap.add_argument("--factor", type=int, default=2, help="size step")
    ap.add_argument("--rounds", type=int, default=3, help="alternating llmc/torch rounds per size (median)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the calls per size")
    ap.add_argument("--hidden", type=int, default=4096, help="decode hidden size (elements)")
    ap.add_argument("--graph-calls", type=int, default=100, help="all-reduces per captured graph")
    ap.add_argument("--no-torch", action="store_true", help="time NcclComm alone")
    ap.add_argument("--oneshot-shim", help="also time the one-shot all-reduce kernel of this shim library")
    ap.add_argument("--oneshot-max-bytes", type=parse_bytes, default=1 << 20,
                    help="largest message the one-shot kernel takes (its buffers are twice this)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from llmc.runtime.dist.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        result = pathlib.Path(tmp) / "result.json"
        argv = sys.argv[1:]  # the workers ignore --json: the figures come back through `result`
        print(f"launching {a.nproc} ranks (one per GPU)", flush=True)
        run = launch([sys.executable, os.path.abspath(__file__), *argv, "--worker", "--result", str(result)],
                     a.nproc, timeout=3600, check=False)
        res = json.loads(result.read_text()) if result.exists() else None
    if res is not None:  # figures written before a failure in the teardown still count
        print(table(res))
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(res, indent=1))
            print(f"wrote {a.json}")
    if not run.ok:
        raise SystemExit(f"allreduce_gpu: {run.report()}")


if __name__ == "__main__":
    main()
