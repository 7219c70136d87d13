"""Rank programs the dist tests launch (not a test module): python dist_workers.py SCENARIO OUTDIR [ARGS].

Each reads its rank from the environment, as any rank under the launcher does."""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from llmc.runtime.dist import DistEnv, HostComm, check_consistent, rendezvous

TIMEOUT = 20.0


def data(seed: int, rank: int, shape, dtype) -> np.ndarray:
    """Rank `rank`'s input; the test makes the same arrays to compute the expected results."""
    rng = np.random.default_rng([seed, rank])
    if np.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def collectives(out: str, seed: int) -> None:
    env = DistEnv.from_environ()
    infos = rendezvous(env, {"rank": env.rank, "pid": os.getpid()}, timeout=TIMEOUT)
    assert [i["rank"] for i in infos] == list(range(env.world_size))
    comm = HostComm.create(env, timeout=TIMEOUT)
    n, r = comm.world_size, comm.rank
    res = {}
    for dt in ("float32", "float64", "int64"):
        a = data(seed, r, (7, 33), dt)
        comm.all_reduce(a)
        res[f"all_reduce_{dt}"] = a
    big = data(seed + 1, r, (300_000,), "float32")  # > a socket buffer: exercises partial sends
    comm.all_reduce(big)
    res["all_reduce_big"] = big
    src = data(seed + 2, r, (3, 5), "float32")
    dst = np.empty((3 * n, 5), np.float32)
    comm.all_gather(src, dst)
    res["all_gather"] = dst
    b = data(seed + 3, r, (11,), "float32")
    comm.broadcast(b, root=n - 1)
    res["broadcast"] = b
    # a ring of point-to-point messages: even ranks send first, odd ranks receive first
    msg = data(seed + 4, r, (64, 9), "float32")
    got = np.empty_like(msg)
    nxt, prv = (r + 1) % n, (r - 1) % n
    if r % 2 == 0:
        comm.send(msg, nxt)
        comm.recv(got, prv)
    else:
        comm.recv(got, prv)
        comm.send(msg, nxt)
    res["ring_recv"] = got
    # sub-groups: TP groups of 2 consecutive ranks (color rank // 2), reversed order by key
    tp = comm.split(r // 2, key=-r)
    t = data(seed + 5, r, (4,), "float32")
    tp.all_reduce(t)
    res["tp_sum"] = t
    res["tp_ranks"] = np.array(tp.ranks)
    res["tp_rank"] = np.array(tp.rank)
    none = comm.split(None if r == 0 else 1)
    res["split_none"] = np.array(none is None)
    comm.barrier()
    tp.close()
    comm.close()
    np.savez(os.path.join(out, f"rank{env.rank}.npz"), **res)


def die(out: str, victim: int, how: str) -> None:
    """Every rank meets, then `victim` dies (`exit3` or `sigkill`) and the others wait long."""
    env = DistEnv.from_environ()
    rendezvous(env, {"rank": env.rank}, timeout=TIMEOUT)
    if env.rank == victim:
        print(f"rank {env.rank} about to die ({how})", file=sys.stderr, flush=True)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    time.sleep(120)


def stuck(out: str, victim: int) -> None:
    """`victim` never reaches the rendezvous; the others time out naming it."""
    env = DistEnv.from_environ()
    if env.rank == victim:
        time.sleep(120)
    rendezvous(env, {"rank": env.rank}, timeout=2.0)


def inconsistent(out: str) -> None:
    """Rank 1 was started with another tp and another artifact than the rest."""
    env = DistEnv.from_environ()
    tp = 4 if env.rank == 1 else 2
    infos = rendezvous(env, {"tp": tp, "artifact": "abc" if env.rank != 1 else "abd", "pp": 1}, timeout=TIMEOUT)
    check_consistent(infos, ["tp", "pp", "artifact"])


def nccl(out: str, seed: int) -> None:
    """NcclComm on one GPU per rank: host arrays, device pointers from torch on torch's stream,
    a CUDA graph with an all-reduce captured in it, and a send/recv pair in one group."""
    import torch

    from llmc.runtime.dist import NcclComm

    env = DistEnv.from_environ()
    torch.cuda.set_device(env.local_rank)
    comm = NcclComm.create(env, timeout=60)
    n, r = comm.world_size, comm.rank
    res = {}
    a = data(seed, r, (1000, 3), "float32")
    comm.all_reduce(a)
    res["host_all_reduce"] = a
    src = data(seed + 1, r, (4, 6), "float32")
    dst = np.empty((4 * n, 6), np.float32)
    comm.all_gather(src, dst)
    res["host_all_gather"] = dst
    stream = torch.cuda.current_stream().cuda_stream
    x = torch.from_numpy(data(seed + 2, r, (4096,), "float32")).to("cuda", torch.bfloat16)
    comm.all_reduce_device(x.data_ptr(), x.numel(), "bfloat16", stream)
    res["dev_all_reduce_bf16"] = x.float().cpu().numpy()
    g_src = torch.from_numpy(data(seed + 3, r, (5, 7), "float32")).to("cuda", torch.float16)
    g_dst = torch.empty((5 * n, 7), device="cuda", dtype=torch.float16)
    comm.all_gather_device(g_src.data_ptr(), g_dst.data_ptr(), g_src.numel(), "float16", stream)
    res["dev_all_gather_f16"] = g_dst.float().cpu().numpy()
    # a CUDA graph: y = (x + 1) all-reduced, replayed on new x values
    gx = torch.zeros(256, device="cuda", dtype=torch.float32)
    gy = torch.zeros_like(gx)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        gy.copy_(gx + 1)
        comm.all_reduce_device(gy.data_ptr(), gy.numel(), "float32", side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gy.copy_(gx + 1)
        comm.all_reduce_device(gy.data_ptr(), gy.numel(), "float32", torch.cuda.current_stream().cuda_stream)
    for step in range(3):
        gx.copy_(torch.from_numpy(data(seed + 10 + step, r, (256,), "float32")).cuda())
        graph.replay()
        torch.cuda.synchronize()
        res[f"graph_step{step}"] = gy.cpu().numpy()
    # the runtime's own CUDA graph (runtime/cuda_graph.py, as the GPU executor captures a step)
    from llmc.runtime.cuda_graph import CudaGraph

    buf = torch.zeros(512, device="cuda", dtype=torch.float32)
    torch.cuda.synchronize()
    rg = CudaGraph(env.local_rank)
    rg.capture(lambda: comm.all_reduce_device(buf.data_ptr(), buf.numel(), "float32", rg.stream.ptr), warmup=1)
    for step in range(2):
        buf.copy_(torch.from_numpy(data(seed + 20 + step, r, (512,), "float32")).cuda())
        torch.cuda.synchronize()
        rg.replay()
        rg.synchronize()
        res[f"runtime_graph_step{step}"] = buf.cpu().numpy()
    # ring exchange of int64 in one NCCL group (send and recv together cannot deadlock)
    msg = torch.from_numpy(data(seed + 4, r, (33,), "int64")).cuda()
    got = torch.empty_like(msg)
    with comm.group():
        comm.send_device(msg.data_ptr(), msg.numel(), "int64", (r + 1) % n, stream)
        comm.recv_device(got.data_ptr(), got.numel(), "int64", (r - 1) % n, stream)
    torch.cuda.synchronize()
    res["dev_ring_int64"] = got.cpu().numpy()
    sub = comm.split(0 if r < 2 else None)
    if sub is not None:
        t = np.full(3, float(r + 1), np.float32)
        sub.all_reduce(t)
        res["sub_sum"] = t
        sub.close()
    comm.barrier()
    np.savez(os.path.join(out, f"rank{env.rank}.npz"), **res)
    from llmc.runtime.tp_run import leave

    leave(comm)  # not comm.close(): ncclCommDestroy blocks on the captured graphs' work once peers leave


def oneshot(out: str, seed: int) -> None:
    """The shim's one-shot all-reduce (LLMC_SHIM_LIB) through OneShotAllReduce: several sizes and
    dtypes, in place and not, and inside a CUDA graph replayed on new data (the epochs advance
    in device memory)."""
    import torch
    import tvm_ffi

    from llmc.runtime.dist import NcclComm
    from llmc.runtime.dist.oneshot import OneShotAllReduce
    from llmc.runtime.gpu import import_tvm_cuda

    env = DistEnv.from_environ()
    torch.cuda.set_device(env.local_rank)
    comm = NcclComm.create(env, timeout=60)
    kernel = import_tvm_cuda().runtime.load_module(os.environ["LLMC_SHIM_LIB"])["llmc_allreduce_oneshot"]
    ar, why = OneShotAllReduce.create(comm, kernel, max_bytes=1 << 20)
    assert ar is not None, why
    dev = tvm_ffi.device("cuda", env.local_rank)
    r, res = comm.rank, {}
    stream = torch.cuda.current_stream().cuda_stream
    for k, (shape, dt) in enumerate([((4096,), torch.bfloat16), ((16, 4096), torch.bfloat16), ((6, 40), torch.float16),
                                     ((65536,), torch.float32), ((3, 128), torch.float32)]):
        x = torch.from_numpy(data(seed + k, r, shape, "float32")).to("cuda", dt)
        y = torch.empty_like(x)
        with tvm_ffi.use_raw_stream(dev, stream):
            ar(x, y)
            ar(x, x)  # in place
        torch.cuda.synchronize()
        res[f"out{k}"], res[f"inplace{k}"] = y.float().cpu().numpy(), x.float().cpu().numpy()
    gx = torch.zeros(8192, device="cuda", dtype=torch.bfloat16)
    gy = torch.zeros_like(gx)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), tvm_ffi.use_raw_stream(dev, side.cuda_stream):
        ar(gx, gy)  # warm-up, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with tvm_ffi.use_raw_stream(dev, torch.cuda.current_stream().cuda_stream):
            ar(gx, gy)
            gy.mul_(2)
            ar(gy, gy)
    for step in range(4):
        gx.copy_(torch.from_numpy(data(seed + 30 + step, r, (8192,), "float32")).to("cuda", torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        res[f"graph{step}"] = gy.float().cpu().numpy()
    comm.barrier()
    ar.close()
    np.savez(os.path.join(out, f"rank{env.rank}.npz"), **res)
    from llmc.runtime.tp_run import leave

    leave(comm)


if __name__ == "__main__":
    scenario, outdir, *rest = sys.argv[1:]
    fn = {"collectives": collectives, "die": die, "stuck": stuck, "inconsistent": inconsistent,
          "nccl": nccl, "oneshot": oneshot}[scenario]
    args = [int(a) if a.lstrip("-").isdigit() else a for a in rest]
    fn(outdir, *args)
