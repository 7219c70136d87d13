"""One-shot all-reduce of small messages between the GPUs of one host (CUDA IPC + NVLink).

NCCL's ring spends ~20 us on an all-reduce of a few KiB however it is launched; a tensor-parallel
decode step makes two per layer, so their latency, not the weights, sets the step time. The
shim's `llmc_allreduce_oneshot` kernel (backends/cuda/shim/llmc_allreduce.cu) does it in one
kernel: each rank writes its message into every rank's buffer (its own part of it, over NVLink to
the peers), raises a flag in each peer's memory, waits for theirs and sums the parts from its own
memory.

This module sets up the buffers: every rank cudaMalloc's a region, publishes its IPC handle
through the communicator's store, and opens its peers' handles. Two rounds of the store make the
choice the same on every rank: the one-shot path is used only if every rank has the kernel, all
are on one host and every rank mapped every peer; otherwise `OneShotAllReduce.create` returns
None on every rank with the reason, and the caller keeps NCCL.

The regions are per executor (one stream each): calls on one region must not overlap in time.
"""
from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass

HEADER_BYTES = 4096  # flags and epochs, as the kernel lays them out
MAX_RANKS = 8
DEFAULT_MAX_BYTES = 512 << 10  # above this NCCL's ring wins (measured: benchmarks/allreduce_gpu.py)
IPC_HANDLE_BYTES = 64
_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


def _cudart():
    from .nccl import _cudart as base

    rt, check = base()
    if not getattr(rt, "_llmc_ipc_sigs", False):
        vp, i = ctypes.c_void_p, ctypes.c_int
        rt.cudaMemset.restype, rt.cudaMemset.argtypes = i, [vp, i, ctypes.c_size_t]
        rt.cudaIpcGetMemHandle.restype, rt.cudaIpcGetMemHandle.argtypes = i, [ctypes.POINTER(IpcHandle), vp]
        rt.cudaIpcOpenMemHandle.restype, rt.cudaIpcOpenMemHandle.argtypes = i, [ctypes.POINTER(vp), IpcHandle,
                                                                                ctypes.c_uint]
        rt.cudaIpcCloseMemHandle.restype, rt.cudaIpcCloseMemHandle.argtypes = i, [vp]
        rt.cudaDeviceCanAccessPeer.restype, rt.cudaDeviceCanAccessPeer.argtypes = i, [ctypes.POINTER(i), i, i]
        rt._llmc_ipc_sigs = True
    return rt, check


def _host_id() -> str:
    """Processes on one machine share it (the boot id: containers on one host share that too)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


@dataclass
class OneShotAllReduce:
    """The mapped regions of one group: `bases[r]` is rank r's region as this process sees it.
    Call it with (x, out) device tensors of at most `max_bytes` on the stream TVM-FFI has current."""

    kernel: object  # the shim's llmc_allreduce_oneshot
    rank: int
    world: int
    max_bytes: int
    bases: list[int]
    own: int  # this rank's cudaMalloc'd region
    opened: list[int]  # peers' regions opened here (closed by close())

    @classmethod
    def create(cls, comm, kernel, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple["OneShotAllReduce | None", str]:
        """(the all-reduce, "") or (None, why not): the same answer on every rank of `comm`.
        Every rank must call this at the same point (it meets the others on the store)."""
        world, rank = comm.world_size, comm.rank
        n = getattr(comm, "_oneshot_regions", 0)
        comm._oneshot_regions = n + 1
        what = f"oneshot{n}"
        if world > MAX_RANKS:
            return None, f"more than {MAX_RANKS} ranks"
        rt, check = _cudart()
        check(rt.cudaSetDevice(comm.device), "cudaSetDevice")
        own = 0
        if kernel is not None:  # allocate and publish (host, device, handle)
            ptr = ctypes.c_void_p()
            size = HEADER_BYTES + 2 * world * max_bytes  # two slots of one part per rank
            check(rt.cudaMalloc(ctypes.byref(ptr), size), f"cudaMalloc({size}) for the one-shot all-reduce")
            own = ptr.value
            check(rt.cudaMemset(ptr, 0, size), "cudaMemset")
            handle = IpcHandle()
            check(rt.cudaIpcGetMemHandle(ctypes.byref(handle), ptr), "cudaIpcGetMemHandle")
            # string_at: the whole 64 bytes (the c_char field itself would stop at the first NUL)
            mine = f"{_host_id()}|{comm.device}|".encode() + ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)
        else:
            mine = b""
        entries = comm.exchange_keys(what, mine)
        why = _why_not(entries, rt, comm.device, rank)
        bases, opened = [0] * world, []
        if not why:
            for r, e in enumerate(entries):
                if r == rank:
                    bases[r] = own
                    continue
                h = IpcHandle()
                ctypes.memmove(ctypes.addressof(h), e.split(b"|", 2)[2], IPC_HANDLE_BYTES)
                p = ctypes.c_void_p()
                err = rt.cudaIpcOpenMemHandle(ctypes.byref(p), h, _IPC_LAZY_ENABLE_PEER_ACCESS)
                if err != 0:  # e.g. each rank sees only its own GPU (CUDA_VISIBLE_DEVICES per rank)
                    rt.cudaGetLastError()  # not sticky: clear it
                    why = (f"rank {rank} could not map rank {r}'s buffer (cudaIpcOpenMemHandle error {err}; the "
                           f"ranks must see each other's GPUs: one CUDA_VISIBLE_DEVICES for all, a GPU index each)")
                    break
                bases[r] = p.value
                opened.append(p.value)
        verdicts = comm.exchange_keys(what + "/ok", why.encode())
        reasons = [v.decode() for v in verdicts if v]
        if reasons:
            for p in opened:
                rt.cudaIpcCloseMemHandle(ctypes.c_void_p(p))
            if own:
                rt.cudaFree(ctypes.c_void_p(own))
            return None, reasons[0]
        return cls(kernel, rank, world, max_bytes, bases, own, opened), ""

    def fits(self, nbytes: int, dtype: str) -> bool:
        return 0 < nbytes <= self.max_bytes and nbytes % 16 == 0 and dtype in ("float16", "bfloat16", "float32")

    def __call__(self, x, out) -> None:
        self.kernel(x, out, self.rank, self.world, self.max_bytes, *self.bases, *[0] * (MAX_RANKS - self.world))

    def close(self) -> None:
        rt, _ = _cudart()
        for p in self.opened:
            rt.cudaIpcCloseMemHandle(ctypes.c_void_p(p))
        self.opened = []
        if self.own:
            rt.cudaFree(ctypes.c_void_p(self.own))
            self.own = 0


def _why_not(entries: list[bytes], rt, device: int, rank: int) -> str:
    """'' if every rank published a handle from this host and this GPU reaches every peer's GPU."""
    missing = [r for r, e in enumerate(entries) if not e]
    if missing:
        return f"rank(s) {missing} have no one-shot kernel (an older shim)"
    hosts = {e.split(b"|", 1)[0] for e in entries}
    if len(hosts) > 1:
        return "the ranks span several hosts"
    for r, e in enumerate(entries):
        peer = int(e.split(b"|", 2)[1])
        if r == rank or peer == device:
            continue
        ok = ctypes.c_int()
        if rt.cudaDeviceCanAccessPeer(ctypes.byref(ok), device, peer) != 0 or not ok.value:
            return f"GPU {device} cannot access GPU {peer} directly (no NVLink/PCIe peer access)"
    return ""


__all__ = ["DEFAULT_MAX_BYTES", "OneShotAllReduce"]
