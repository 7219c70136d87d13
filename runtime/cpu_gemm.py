"""llmc's own CPU GEMM (backends/cpu_gemm/llmc_sgemm.cc), loaded through ctypes.

An artifact built on x86-64 ships it as library role "gemm". It computes out = a @ w^T in
float32 with both operands K-contiguous (w stored [N, K]: the layout the compiler gives every
GEMM weight on the CPU, passes/gemm_weight_layout.py), with AVX-512 tiles and a thread pool of
its own, and runs GPT-2's prefill GEMMs 10-30% faster than numpy's OpenBLAS on the 2-core
AVX-512 VM, its GEMVs as fast, and 2-3 row GEMMs 5-10x faster (benchmarks/RESULTS_CPU.md).
Two kernels: under 16 rows dot-product tiles, from 16 rows on A packed in panels (outer
products); within each, a row's result does not depend on which other rows share the call
(a padded decode step gives its real rows the same bits). Where it does not
apply, runtime/blas.py calls numpy: a processor without AVX-512F/VL, float64, operands that
are not K-contiguous.
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import threading
import warnings

import numpy as np

from .cpu_features import host_cpu_features
from .threads import cpu_threads

_P, _I = ctypes.c_void_p, ctypes.c_int64


class Sgemm:
    """out[M, N] = a[M, K] @ w[N, K]^T, float32, rows contiguous (any row strides).

    A weight's GEMMs of PACKED_W_ROWS rows or more (`weight_gemm`) read a copy of it packed once, at
    its first such call, into the layout of the library's many-row kernel (panels of 64 of W's rows,
    k-major): that kernel then packs nothing per call (it packs A's rows otherwise) and stores C's
    rows as they are; the same bits either way. Measured on the 2-core Xeon (same-process pairs of
    compiled models, median of per-round ratios): MiniLM 8 x 128 0.85-0.89x the time; GPT-2 4 x 128
    level; at 128 rows level too (GPT-2 1 x 128 1.02, the small Llama 0.98), so short prompts keep
    packing A and spend no memory. The cost is memory: a packed weight is held twice (decode's GEMVs
    read the rows in place). `pack_weights`: True packs up to an eighth of the machine's memory
    (then the other weights are read in place), an int that many bytes, False (or 0) nothing."""

    PACKED_W_ROWS = 256

    def __init__(self, lib: ctypes.CDLL, threads: int, pack_weights: bool | int = True):
        self._fn = lib.llmc_sgemm_nt
        self._fn.argtypes = [_P, _I, _P, _I, _P, _I, _I, _I, _I, ctypes.c_int]
        self._fn.restype = ctypes.c_int
        self.threads = threads
        if pack_weights is True:
            pack_weights = _memory_bytes() // 8
        self.pack_budget = int(pack_weights)  # bytes of packed copies this Sgemm may hold
        self._pack_held = 0
        # the packed-weight entry points; absent from a library built before them
        self.packs = self.pack_budget > 0 and hasattr(lib, "llmc_sgemm_pack_w")
        if self.packs:
            self._floats, self._pack, self._fn_packed = (lib.llmc_sgemm_packed_floats, lib.llmc_sgemm_pack_w,
                                                         lib.llmc_sgemm_nt_packed)
            self._floats.argtypes, self._floats.restype = [_I, _I], _I
            self._pack.argtypes, self._pack.restype = [_P, _I, _I, _I, _P, ctypes.c_int], ctypes.c_int
            self._fn_packed.argtypes = [_P, _I, _P, _P, _I, _I, _I, _I, ctypes.c_int]
            self._fn_packed.restype = ctypes.c_int
        # (data address, shape, strides) -> (the weight, its panels, or None past the budget); the
        # weight is held so that its address is never another array's while the entry lives
        self._packed: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
        self._pack_lock = threading.Lock()
        # the library's attention (runtime/cpu_attention.py); None in a library built before it
        self.attention = getattr(lib, "llmc_attention_f32", None)
        if self.attention is not None:
            self.attention.argtypes = [_P, _P, _P, _P, _P, ctypes.c_int, _P, _I, _I, _I, _I, _I, _I, _I,
                                       ctypes.c_float, ctypes.c_int, ctypes.c_int]
            self.attention.restype = ctypes.c_int

    def takes(self, a: np.ndarray, w: np.ndarray, out: np.ndarray) -> bool:
        """Whether these 2-D views are ones this kernel reads (else the caller uses numpy)."""
        return a.dtype == w.dtype == out.dtype == np.float32 and all(x.strides[1] == 4 for x in (a, w, out))

    @staticmethod
    def _dims(a: np.ndarray, w: np.ndarray, out: np.ndarray) -> tuple[int, int, int]:
        m, k = a.shape
        n = w.shape[0]
        if w.shape[1] != k or out.shape != (m, n):
            raise ValueError(f"sgemm: a {a.shape}, w {w.shape}, out {out.shape} do not make out = a @ w^T")
        return m, n, k

    def __call__(self, a: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
        m, n, k = self._dims(a, w, out)
        rc = self._fn(a.ctypes.data, a.strides[0] // 4, w.ctypes.data, w.strides[0] // 4,
                      out.ctypes.data, out.strides[0] // 4, m, n, k, self.threads)
        if rc != 0:
            raise RuntimeError("llmc_sgemm_nt refused to run (this processor lacks AVX-512F/VL)")

    def packed_weight(self, w: np.ndarray) -> np.ndarray | None:
        """w's panels, made at the first call for it, or None where they would pass the budget. w must be
        a weight: its values never change."""
        key = (w.ctypes.data, w.shape, w.strides)
        hit = self._packed.get(key)
        if hit is None:
            with self._pack_lock:  # concurrent first calls pack it once
                hit = self._packed.get(key)
                if hit is None:
                    hit = self._packed[key] = (w, self._pack_copy(w))
        return hit[1]

    def _pack_copy(self, w: np.ndarray) -> np.ndarray | None:
        n, k = w.shape
        size = self._floats(n, k)
        if self._pack_held + 4 * size > self.pack_budget:
            return None
        buf = np.empty(size + 16, np.float32)
        start = (-buf.ctypes.data // 4) % 16  # 64-byte aligned: a panel's rows are whole lines
        wp = buf[start:start + size]
        if self._pack(w.ctypes.data, w.strides[0] // 4, n, k, wp.ctypes.data, self.threads) != 0:
            raise RuntimeError("llmc_sgemm_pack_w refused to run")
        self._pack_held += 4 * size
        return wp

    def weight_gemm(self, a: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
        """As __call__ for a w that is a weight: from PACKED_W_ROWS rows on, from its packed copy
        where it has one (or room for one)."""
        if self.packs and a.shape[0] >= self.PACKED_W_ROWS:
            m, n, k = self._dims(a, w, out)
            wp = self.packed_weight(w)
            if wp is not None:
                if self._fn_packed(a.ctypes.data, a.strides[0] // 4, wp.ctypes.data, out.ctypes.data,
                                   out.strides[0] // 4, m, n, k, self.threads) != 0:
                    raise RuntimeError("llmc_sgemm_nt_packed refused to run")
                return
        self(a, w, out)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # a system that does not say
        return 16 << 30


def load_sgemm(path: str | pathlib.Path | None, pack_weights: bool | int = True) -> Sgemm | None:
    """The library at `path` as an Sgemm, or None where it cannot run on this processor. `pack_weights`:
    see Sgemm."""
    if path is None or not {"AVX512F", "AVX512VL"} <= host_cpu_features():
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # e.g. built against a newer C library than this system's: numpy's BLAS does the GEMMs
        warnings.warn(f"llmc's CPU GEMM library {path} does not load here ({e}); using numpy's BLAS", stacklevel=2)
        return None
    if lib.llmc_sgemm_supported() != 1:  # its own CPUID check agrees with numpy's, or we do not use it
        return None
    return Sgemm(lib, cpu_threads(), pack_weights)


__all__ = ["Sgemm", "load_sgemm"]
