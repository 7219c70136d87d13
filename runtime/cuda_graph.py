"""CUDA streams and graphs for the runtime, with TVM's runtime and ctypes only (no torch).

TVM kernels and the llmc CUDA shim both launch on the stream that tvm_ffi holds as "current"
for the device (`TVMFFIEnvGetStream(kDLCUDA, dev)`); this module creates a stream, makes it
current (`tvm_ffi.use_raw_stream`), captures whatever is called meanwhile into a CUDA graph
and replays it::

    g = CudaGraph(device_id=0)
    g.capture(lambda: step(*args), warmup=1)   # eager warm-up run(s) on the stream, then capture
    g.replay(); g.synchronize()

Graph rules: the captured calls must not allocate or copy to/from the host, and must keep
using the same buffers (replay re-runs the same kernels on the same pointers with the same
scalars); run once eagerly first (`warmup`) so that module loading, cuBLASLt handles and
workspaces are created outside the capture.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from typing import Callable

_CAPTURE_MODES = {"global": 0, "thread_local": 1, "relaxed": 2}
_cudart = None


class CudaError(RuntimeError):
    pass


def _candidates() -> list[str]:
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    env = os.environ.get("LLMC_CUDART")
    if env:
        names.insert(0, env)
    for p in sys.path:  # pip's nvidia-cuda-runtime package
        if p and os.path.isdir(os.path.join(p, "nvidia")):
            names += sorted(glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcudart.so.1[23]")))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    names += sorted(glob.glob(os.path.join(cuda_home, "lib*", "libcudart.so.1[23]")))
    return names


def cudart() -> ctypes.CDLL:
    """The CUDA runtime library (the copy TVM's CUDA plugin already loaded, if any)."""
    global _cudart
    if _cudart is None:
        errors = []
        for name in _candidates():
            try:
                lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError as e:
                errors.append(f"{name}: {e}")
        else:
            raise CudaError("libcudart not found (set LLMC_CUDART):\n  " + "\n  ".join(errors))
        vp = ctypes.c_void_p
        sig = {
            "cudaGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
            "cudaSetDevice": (ctypes.c_int, [ctypes.c_int]),
            "cudaGetDevice": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
            "cudaStreamCreateWithFlags": (ctypes.c_int, [ctypes.POINTER(vp), ctypes.c_uint]),
            "cudaStreamDestroy": (ctypes.c_int, [vp]),
            "cudaStreamSynchronize": (ctypes.c_int, [vp]),
            "cudaStreamBeginCapture": (ctypes.c_int, [vp, ctypes.c_int]),
            "cudaStreamEndCapture": (ctypes.c_int, [vp, ctypes.POINTER(vp)]),
            "cudaGraphInstantiate": (ctypes.c_int, [ctypes.POINTER(vp), vp, ctypes.c_ulonglong]),
            "cudaGraphLaunch": (ctypes.c_int, [vp, vp]),
            "cudaGraphExecDestroy": (ctypes.c_int, [vp]),
            "cudaGraphDestroy": (ctypes.c_int, [vp]),
            "cudaGraphGetNodes": (ctypes.c_int, [vp, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_size_t)]),
            "cudaEventCreate": (ctypes.c_int, [ctypes.POINTER(vp)]),
            "cudaEventDestroy": (ctypes.c_int, [vp]),
            "cudaEventRecord": (ctypes.c_int, [vp, vp]),
            "cudaEventSynchronize": (ctypes.c_int, [vp]),
            "cudaEventElapsedTime": (ctypes.c_int, [ctypes.POINTER(ctypes.c_float), vp, vp]),
            "cudaDeviceSynchronize": (ctypes.c_int, []),
            "cudaGetLastError": (ctypes.c_int, []),
            "cudaMemGetInfo": (ctypes.c_int, [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
            "cudaHostAlloc": (ctypes.c_int, [ctypes.POINTER(vp), ctypes.c_size_t, ctypes.c_uint]),
            "cudaFreeHost": (ctypes.c_int, [vp]),
            "cudaMemcpyAsync": (ctypes.c_int, [vp, vp, ctypes.c_size_t, ctypes.c_int, vp]),
            "cudaMemcpy": (ctypes.c_int, [vp, vp, ctypes.c_size_t, ctypes.c_int]),
        }
        for fn, (res, args) in sig.items():
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        _cudart = lib
    return _cudart


def check(err: int, what: str = "CUDA call") -> None:
    if err != 0:
        msg = cudart().cudaGetErrorString(err)
        raise CudaError(f"{what} failed: error {err} ({msg.decode() if msg else '?'})")


def _tvm_ffi_device(device_id: int):
    import tvm_ffi

    return tvm_ffi.device("cuda", device_id)


class Stream:
    """A non-blocking CUDA stream that can be made TVM's current stream for its device."""

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        rt = cudart()
        check(rt.cudaSetDevice(device_id), "cudaSetDevice")
        h = ctypes.c_void_p()
        check(rt.cudaStreamCreateWithFlags(ctypes.byref(h), 1), "cudaStreamCreateWithFlags")  # 1: non-blocking
        self.handle = h

    @property
    def ptr(self) -> int:
        return self.handle.value or 0

    @contextlib.contextmanager
    def use(self):
        """TVM kernels and shim calls made inside run on this stream."""
        import tvm_ffi

        with tvm_ffi.use_raw_stream(_tvm_ffi_device(self.device_id), self.ptr):
            yield self

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None and self.handle.value:
            cudart().cudaStreamDestroy(self.handle)
            self.handle = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def copy_runs(items, align: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges covering items (offset, nbytes) by increasing offset, an item
    joining the previous range where it starts at that range's end rounded up to `align` (the
    layout of back-to-back arrays: the padding between them is copied too)."""
    runs: list[list[int]] = []
    for off, n in items:
        if runs and -(-runs[-1][1] // align) * align == off:
            runs[-1][1] = off + n
        else:
            runs.append([off, off + n])
    return [(a, b) for a, b in runs]


class HostToDevice:
    """Small host arrays copied into one device block without a synchronous copy each: written
    into views of one pinned buffer at the block's offsets (view), then cudaMemcpyAsync on the
    stream the next launches use, one copy per run of adjacent arrays (send; copy_runs: a decode
    step's token ids and page metadata go in one copy, where six synchronous ones cost ~0.3 ms).
    An event guards the buffer: acquire() waits until the previous copies have run."""

    ALIGN = 256  # the arrays' offsets in the block are multiples of this

    def __init__(self, nbytes: int):
        rt = cudart()
        self.nbytes = max(int(nbytes), 64)
        self._ptr = ctypes.c_void_p()
        check(rt.cudaHostAlloc(ctypes.byref(self._ptr), self.nbytes, 0), "cudaHostAlloc")
        import numpy as np

        self._host = np.frombuffer((ctypes.c_uint8 * self.nbytes).from_address(self._ptr.value), np.uint8)
        self._event = ctypes.c_void_p()
        check(rt.cudaEventCreate(ctypes.byref(self._event)), "cudaEventCreate")
        self._pending = False

    def acquire(self) -> None:
        """Wait until the copies last sent have read the buffer (call before writing into it)."""
        if self._pending:
            check(cudart().cudaEventSynchronize(self._event), "cudaEventSynchronize")
            self._pending = False

    def view(self, offset: int, shape: tuple[int, ...], dtype):
        """A numpy view of the buffer at `offset` (write into it after acquire(), then send())."""
        import numpy as np

        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + n > self.nbytes:
            raise CudaError(f"staging buffer of {self.nbytes} bytes is too small")
        return self._host[offset:offset + n].view(dtype).reshape(shape)

    def send(self, block_ptr: int, runs, stream: Stream) -> None:
        """Enqueue the copies of the byte ranges `runs` ([start, end), copy_runs) to the device
        block at block_ptr on stream."""
        rt = cudart()
        for start, end in runs:
            check(rt.cudaMemcpyAsync(ctypes.c_void_p(block_ptr + start), ctypes.c_void_p(self._ptr.value + start),
                                     end - start, 1, stream.handle), "cudaMemcpyAsync")
        check(rt.cudaEventRecord(self._event, stream.handle), "cudaEventRecord")
        self._pending = True

    def close(self) -> None:
        if self._ptr is not None and self._ptr.value:
            rt = cudart()
            rt.cudaEventSynchronize(self._event)
            rt.cudaEventDestroy(self._event)
            self._host = None  # a view of the memory freed next
            rt.cudaFreeHost(self._ptr)
            self._ptr = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class CudaGraph:
    """Capture a sequence of TVM / shim calls once, replay it with one launch."""

    def __init__(self, device_id: int = 0, stream: Stream | None = None):
        self.device_id = device_id
        self.stream = stream or Stream(device_id)
        self._graph = ctypes.c_void_p()
        self._exec = ctypes.c_void_p()

    @contextlib.contextmanager
    def capturing(self, mode: str = "thread_local"):
        """Calls made inside the `with` block are recorded (not run) into this graph."""
        rt = cudart()
        self.reset()
        with self.stream.use():
            check(rt.cudaStreamBeginCapture(self.stream.handle, _CAPTURE_MODES[mode]), "cudaStreamBeginCapture")
            graph = ctypes.c_void_p()
            try:
                yield self
            finally:
                err = rt.cudaStreamEndCapture(self.stream.handle, ctypes.byref(graph))
            check(err, "cudaStreamEndCapture (a call inside the capture was not capturable?)")
        self._graph = graph
        ex = ctypes.c_void_p()
        check(rt.cudaGraphInstantiate(ctypes.byref(ex), graph, 0), "cudaGraphInstantiate")
        self._exec = ex

    def capture(self, fn: Callable[[], object], warmup: int = 1, mode: str = "thread_local") -> "CudaGraph":
        """Run `fn` `warmup` times eagerly on the graph's stream, then capture one call of it."""
        with self.stream.use():
            for _ in range(warmup):
                fn()
        self.stream.synchronize()
        with self.capturing(mode):
            fn()
        return self

    @property
    def num_nodes(self) -> int:
        n = ctypes.c_size_t(0)
        check(cudart().cudaGraphGetNodes(self._graph, None, ctypes.byref(n)), "cudaGraphGetNodes")
        return n.value

    def replay(self) -> None:
        if not self._exec.value:
            raise CudaError("nothing captured")
        check(cudart().cudaGraphLaunch(self._exec, self.stream.handle), "cudaGraphLaunch")

    def synchronize(self) -> None:
        self.stream.synchronize()

    def reset(self) -> None:
        rt = cudart()
        if self._exec is not None and self._exec.value:
            rt.cudaGraphExecDestroy(self._exec)
        if self._graph is not None and self._graph.value:
            rt.cudaGraphDestroy(self._graph)
        self._exec, self._graph = ctypes.c_void_p(), ctypes.c_void_p()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.reset()


class EventTimer:
    """Device-side timing on a stream: `with t: ...` then `t.ms` (synchronizes on exit)."""

    def __init__(self, stream: Stream):
        self.stream = stream
        rt = cudart()
        self._a, self._b = ctypes.c_void_p(), ctypes.c_void_p()
        check(rt.cudaEventCreate(ctypes.byref(self._a)), "cudaEventCreate")
        check(rt.cudaEventCreate(ctypes.byref(self._b)), "cudaEventCreate")
        self.ms = 0.0

    def __enter__(self):
        check(cudart().cudaEventRecord(self._a, self.stream.handle), "cudaEventRecord")
        return self

    def __exit__(self, *exc):
        rt = cudart()
        check(rt.cudaEventRecord(self._b, self.stream.handle), "cudaEventRecord")
        check(rt.cudaEventSynchronize(self._b), "cudaEventSynchronize")
        ms = ctypes.c_float()
        check(rt.cudaEventElapsedTime(ctypes.byref(ms), self._a, self._b), "cudaEventElapsedTime")
        self.ms = ms.value
        return False

    def __del__(self):
        with contextlib.suppress(Exception):
            cudart().cudaEventDestroy(self._a)
            cudart().cudaEventDestroy(self._b)


__all__ = ["CudaError", "CudaGraph", "EventTimer", "Stream", "cudart", "check"]
