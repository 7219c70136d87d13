"""NcclComm: NCCL collectives on device memory through ctypes (libnccl.so.2, no torch/cupy).

The library comes from pip's `nvidia-nccl-cu13` (the `nvidia.nccl` package's lib/), else any
`nvidia/nccl/lib` on sys.path, else the loader's search path (LD_LIBRARY_PATH, ldconfig).
The CUDA runtime is the one runtime/cuda_graph.py loads for the executor.

Setup: group rank 0 calls ncclGetUniqueId and publishes the id through the job's store; the
members meet on the store (a rank that does not arrive is named after the timeout, before
ncclCommInitRank could block on it), then each calls ncclCommInitRank on its device.

Device calls enqueue on the caller's CUDA stream and return at once; called while that stream
is being captured, they become nodes of the CUDA graph (NCCL supports capture). Host calls
(numpy arrays) copy through a device buffer on a private stream and block.

NVLink multicast (NVLS) is turned off (NCCL_NVLS_ENABLE=0) unless the environment says
otherwise: on shared hosts it can take GPUs out of service.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Sequence

import numpy as np

from .comm import GroupBase, check_device_args, check_gather_shapes, host_array
from .errors import NcclError
from .rendezvous import DEFAULT_TIMEOUT, DistEnv, connect_store
from .store import Store

NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
               "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_SUM = 0
UNIQUE_ID_BYTES = 128
_H2D, _D2H = 1, 2

_nccl = None
_nccl_path = None


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * UNIQUE_ID_BYTES)]


def _candidates() -> list[str]:
    names = []
    try:
        import nvidia.nccl as pkg  # the nvidia-nccl-cu13 wheel (a namespace package: no __file__)

        names += [os.path.join(p, "lib", "libnccl.so.2") for p in pkg.__path__]
    except ImportError:
        pass
    for p in sys.path:
        names += sorted(glob.glob(os.path.join(p or ".", "nvidia", "nccl", "lib", "libnccl.so.2")))
    names.append("libnccl.so.2")
    found = ctypes.util.find_library("nccl")
    if found:
        names.append(found)
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def load_nccl() -> ctypes.CDLL:
    """libnccl with the signatures used here (NCCL_NVLS_ENABLE=0 set first unless set)."""
    global _nccl, _nccl_path
    if _nccl is not None:
        return _nccl
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    errors = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)  # local: its symbols stay out of other libraries' way
            break
        except OSError as e:
            errors.append(f"{name}: {e}")
    else:
        raise NcclError("libnccl.so.2 not found; install the nvidia-nccl-cu13 wheel (pip install nvidia-nccl-cu13) "
                        "or put libnccl.so.2 on LD_LIBRARY_PATH. Tried:\n  " + "\n  ".join(errors))
    res, vp, i, sz = ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sig = {
        "ncclGetVersion": (res, [ctypes.POINTER(i)]),
        "ncclGetUniqueId": (res, [ctypes.POINTER(UniqueId)]),
        "ncclCommInitRank": (res, [ctypes.POINTER(vp), i, UniqueId, i]),
        "ncclCommDestroy": (res, [vp]),
        "ncclCommAbort": (res, [vp]),
        "ncclGetErrorString": (ctypes.c_char_p, [res]),
        "ncclCommCount": (res, [vp, ctypes.POINTER(i)]),
        "ncclCommUserRank": (res, [vp, ctypes.POINTER(i)]),
        "ncclAllReduce": (res, [vp, vp, sz, i, i, vp, vp]),
        "ncclBroadcast": (res, [vp, vp, sz, i, i, vp, vp]),
        "ncclAllGather": (res, [vp, vp, sz, i, vp, vp]),
        "ncclSend": (res, [vp, sz, i, i, vp, vp]),
        "ncclRecv": (res, [vp, sz, i, i, vp, vp]),
        "ncclGroupStart": (res, []),
        "ncclGroupEnd": (res, []),
    }
    for fn, (r, args) in sig.items():
        try:
            f = getattr(lib, fn)
        except AttributeError:
            raise NcclError(f"{name} lacks {fn}: NCCL >= 2.7 is needed") from None
        f.restype, f.argtypes = r, args
    if hasattr(lib, "ncclGetLastError"):  # NCCL >= 2.13: the reason behind an error code
        lib.ncclGetLastError.restype, lib.ncclGetLastError.argtypes = ctypes.c_char_p, [vp]
    _nccl, _nccl_path = lib, name
    return lib


def nccl_version() -> tuple[int, int, int]:
    v = ctypes.c_int()
    _check(load_nccl().ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
    code = v.value
    return (code // 10000, code // 100 % 100, code % 100) if code >= 10000 else (code // 1000, code // 100 % 10,
                                                                                  code % 100)


def _check(result: int, what: str, comm: ctypes.c_void_p | None = None) -> None:
    if result == 0:
        return
    lib = load_nccl()
    msg = lib.ncclGetErrorString(result)
    detail = ""
    if hasattr(lib, "ncclGetLastError"):
        last = lib.ncclGetLastError(comm)
        detail = f": {last.decode(errors='replace')}" if last else ""
    raise NcclError(f"{what} failed: {msg.decode() if msg else '?'} (ncclResult {result}){detail}")


def _cudart():
    """The runtime's libcudart (runtime/cuda_graph.py) plus the few calls only this module makes."""
    from .. import cuda_graph

    try:
        rt = cuda_graph.cudart()
    except cuda_graph.CudaError as e:
        raise NcclError(f"NcclComm needs the CUDA runtime: {e}") from None
    if not getattr(rt, "_llmc_dist_sigs", False):
        vp = ctypes.c_void_p
        rt.cudaMalloc.restype, rt.cudaMalloc.argtypes = ctypes.c_int, [ctypes.POINTER(vp), ctypes.c_size_t]
        rt.cudaFree.restype, rt.cudaFree.argtypes = ctypes.c_int, [vp]
        rt.cudaGetDeviceCount.restype, rt.cudaGetDeviceCount.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]
        rt._llmc_dist_sigs = True

    def check(err: int, what: str) -> None:
        try:
            cuda_graph.check(err, what)
        except cuda_graph.CudaError as e:
            raise NcclError(str(e)) from None
    return rt, check


def device_count() -> int:
    rt, check = _cudart()
    n = ctypes.c_int()
    check(rt.cudaGetDeviceCount(ctypes.byref(n)), "cudaGetDeviceCount")
    return n.value


class NcclComm(GroupBase):
    """An NCCL communicator over a group of ranks, one GPU each.

    `NcclComm.create(env, device=None)` makes the world group (device: LOCAL_RANK modulo the
    visible GPUs unless given); `NcclComm(store, global_rank, ranks, name, device)` a group
    of the given global ranks (called by its members only); `split(color, key)` sub-groups."""

    def __init__(self, store: Store, global_rank: int, ranks: Sequence[int], name: str = "world",
                 device: int = 0, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(store, global_rank, ranks, name, timeout)
        self.lib = load_nccl()
        self.device = int(device)
        self._comm = ctypes.c_void_p()
        self._stream = None  # private stream of the host calls
        rt, check = _cudart()
        check(rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        uid = UniqueId()
        if self.rank == 0:
            _check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        raw = bytes(uid.internal) if self.rank == 0 else b""
        ids = self.exchange_keys("nccl_id", raw)  # also the meeting point: every member arrived
        if len(ids[0]) != UNIQUE_ID_BYTES:
            raise NcclError(f"communicator {self.name!r}: group rank 0 published {len(ids[0])} bytes as its NCCL id")
        ctypes.memmove(ctypes.addressof(uid), ids[0], UNIQUE_ID_BYTES)
        _check(self.lib.ncclCommInitRank(ctypes.byref(self._comm), self.world_size, uid, self.rank),
               f"ncclCommInitRank (group {self.name!r}, rank {self.rank} of {self.world_size}, GPU {self.device})")

    @classmethod
    def create(cls, env: DistEnv | None = None, device: int | None = None, timeout: float = DEFAULT_TIMEOUT,
               name: str = "world") -> "NcclComm":
        env = DistEnv.from_environ() if env is None else env
        if device is None:
            device = env.local_rank % max(1, device_count())
        store = connect_store(env, timeout) if env.world_size > 1 else None
        return cls(store, env.rank, range(env.world_size), name, device, timeout)  # type: ignore[arg-type]

    def subgroup(self, ranks: Sequence[int], name: str) -> "NcclComm":
        return NcclComm(self.store, self.global_rank, ranks, name, self.device, self.timeout)

    @property
    def handle(self) -> int:
        """The ncclComm_t, for code that calls NCCL itself."""
        return self._comm.value or 0

    def _live(self, what: str) -> ctypes.c_void_p:
        if not self._comm.value:
            raise NcclError(f"{what}: communicator {self.name!r} is closed")
        return self._comm

    # ---- device calls (enqueued on `stream`) -------------------------------------------------
    def all_reduce_device(self, ptr: int, count: int, dtype: str, stream: int = 0, out_ptr: int | None = None) -> None:
        """Sum over the group, in place (or into out_ptr)."""
        check_device_args(ptr, count, dtype, "all_reduce_device")
        c = self._live("all_reduce_device")
        _check(self.lib.ncclAllReduce(ptr, ptr if out_ptr is None else out_ptr, count, NCCL_DTYPES[dtype], NCCL_SUM,
                                      c, stream), "ncclAllReduce", c)

    def all_gather_device(self, src_ptr: int, dst_ptr: int, count: int, dtype: str, stream: int = 0) -> None:
        """dst (world_size * count elements) = every rank's count elements of src, in rank order."""
        check_device_args(src_ptr, count, dtype, "all_gather_device")
        check_device_args(dst_ptr, count, dtype, "all_gather_device")
        c = self._live("all_gather_device")
        _check(self.lib.ncclAllGather(src_ptr, dst_ptr, count, NCCL_DTYPES[dtype], c, stream), "ncclAllGather", c)

    def broadcast_device(self, ptr: int, count: int, dtype: str, root: int = 0, stream: int = 0) -> None:
        check_device_args(ptr, count, dtype, "broadcast_device")
        root = self._check_peer(root, "broadcast_device")
        c = self._live("broadcast_device")
        _check(self.lib.ncclBroadcast(ptr, ptr, count, NCCL_DTYPES[dtype], root, c, stream), "ncclBroadcast", c)

    def send_device(self, ptr: int, count: int, dtype: str, peer: int, stream: int = 0) -> None:
        check_device_args(ptr, count, dtype, "send_device")
        peer = self._check_peer(peer, "send_device")
        c = self._live("send_device")
        _check(self.lib.ncclSend(ptr, count, NCCL_DTYPES[dtype], peer, c, stream), "ncclSend", c)

    def recv_device(self, ptr: int, count: int, dtype: str, peer: int, stream: int = 0) -> None:
        check_device_args(ptr, count, dtype, "recv_device")
        peer = self._check_peer(peer, "recv_device")
        c = self._live("recv_device")
        _check(self.lib.ncclRecv(ptr, count, NCCL_DTYPES[dtype], peer, c, stream), "ncclRecv", c)

    @contextlib.contextmanager
    def group(self):
        """Calls inside are fused into one NCCL launch (ncclGroupStart/End): needed for a send
        and a recv between the same two ranks in both directions, which would deadlock apart."""
        _check(self.lib.ncclGroupStart(), "ncclGroupStart")
        try:
            yield self
        finally:
            _check(self.lib.ncclGroupEnd(), "ncclGroupEnd", self._comm)

    # ---- host calls: through a device buffer ---------------------------------------------------
    def _host_stream(self):
        if self._stream is None:
            from ..cuda_graph import CudaError, Stream

            try:
                self._stream = Stream(self.device)
            except CudaError as e:
                raise NcclError(str(e)) from None
        return self._stream

    def _sync(self) -> None:
        rt, check = _cudart()
        check(rt.cudaStreamSynchronize(self._host_stream().handle), "cudaStreamSynchronize")

    @contextlib.contextmanager
    def _device_copy(self, nbytes: int):
        rt, check = _cudart()
        check(rt.cudaSetDevice(self.device), "cudaSetDevice")
        p = ctypes.c_void_p()
        check(rt.cudaMalloc(ctypes.byref(p), max(1, nbytes)), f"cudaMalloc({nbytes})")
        try:
            yield p.value
        finally:
            rt.cudaFree(p)

    def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if nbytes:
            rt, check = _cudart()
            check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, self._host_stream().handle), "cudaMemcpyAsync")

    def _host_dtype(self, a: np.ndarray, what: str) -> str:
        name = a.dtype.name
        if name not in NCCL_DTYPES:
            raise NcclError(f"{what}: NCCL has no {name} type (one of {', '.join(NCCL_DTYPES)})")
        return name

    def all_reduce(self, buf: np.ndarray) -> None:
        host_array(buf, "all_reduce")
        dt = self._host_dtype(buf, "all_reduce")
        s = self._host_stream()
        with self._device_copy(buf.nbytes) as d:
            self._copy(d, buf.ctypes.data, buf.nbytes, _H2D)
            self.all_reduce_device(d, buf.size, dt, s.ptr)
            self._copy(buf.ctypes.data, d, buf.nbytes, _D2H)
            self._sync()

    def all_gather(self, src: np.ndarray, dst: np.ndarray) -> None:
        host_array(src, "all_gather", writeable=False)
        host_array(dst, "all_gather")
        check_gather_shapes(src, dst, self.world_size)
        dt = self._host_dtype(src, "all_gather")
        s = self._host_stream()
        with self._device_copy(src.nbytes) as ds, self._device_copy(dst.nbytes) as dd:
            self._copy(ds, src.ctypes.data, src.nbytes, _H2D)
            self.all_gather_device(ds, dd, src.size, dt, s.ptr)
            self._copy(dst.ctypes.data, dd, dst.nbytes, _D2H)
            self._sync()

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        host_array(buf, "broadcast")
        dt = self._host_dtype(buf, "broadcast")
        s = self._host_stream()
        with self._device_copy(buf.nbytes) as d:
            self._copy(d, buf.ctypes.data, buf.nbytes, _H2D)
            self.broadcast_device(d, buf.size, dt, root, s.ptr)
            self._copy(buf.ctypes.data, d, buf.nbytes, _D2H)
            self._sync()

    def send(self, buf: np.ndarray, peer: int) -> None:
        host_array(buf, "send", writeable=False)
        dt = self._host_dtype(buf, "send")
        s = self._host_stream()
        with self._device_copy(buf.nbytes) as d:
            self._copy(d, buf.ctypes.data, buf.nbytes, _H2D)
            self.send_device(d, buf.size, dt, peer, s.ptr)
            self._sync()

    def recv(self, buf: np.ndarray, peer: int) -> None:
        host_array(buf, "recv")
        dt = self._host_dtype(buf, "recv")
        s = self._host_stream()
        with self._device_copy(buf.nbytes) as d:
            self.recv_device(d, buf.size, dt, peer, s.ptr)
            self._copy(buf.ctypes.data, d, buf.nbytes, _D2H)
            self._sync()

    def barrier(self) -> None:
        """All ranks reach this point (a 1-element all-reduce on the device, waited for)."""
        self.all_reduce(np.zeros(1, np.int32))

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """ncclCommDestroy (waits for this communicator's queued work)."""
        if self._comm.value:
            comm, self._comm = self._comm, ctypes.c_void_p()
            _check(self.lib.ncclCommDestroy(comm), "ncclCommDestroy")
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._close_store()

    def abort(self) -> None:
        """ncclCommAbort: drop the communicator at once, e.g. after a peer died mid-call."""
        if self._comm.value:
            comm, self._comm = self._comm, ctypes.c_void_p()
            self.lib.ncclCommAbort(comm)
        self._close_store()
