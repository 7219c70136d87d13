"""GEMMs of a CPU artifact that run in the BLAS numpy bundles (route "blas" in the manifest).

numpy's wheels ship OpenBLAS built for every x86-64 / ARMv8 generation it knows, choosing
its kernels at load time for the processor it finds, so a portable (x86-64-v3) artifact
still gets AVX-512 GEMMs on a machine that has them. The compiler (backends/cpu_blas.py)
routes a float32/float64 MATMUL with a 2-D right operand here; `np.matmul` into the planned
output buffer calls sgemm/dgemm (OpenBLAS forwards GEMV-shaped ones to its GEMV) with no
copies: the operands are 2-D views of contiguous buffers (leading dims flattened into M)
and W^T is a transposed view, which the BLAS reads with its transpose flag.

Why not oneMKL, which runs this VM's prefill GEMMs at 230-310 GFLOP/s against OpenBLAS's
160-190: torch exports its own statically linked MKL's symbols (23,600 of them) from
libtorch_cpu.so, and oneMKL's pip package, loaded into a process that imported torch, binds
to some of them and returns wrong results (measured); loading it in a private link-map
namespace (dlmopen) crashed. A runtime that is wrong whenever torch is imported first is
not one users can trust, so the BLAS is numpy's.

Where the artifact ships llmc's own GEMM (library role "gemm", runtime/cpu_gemm.py) and the
processor runs it, a float32 GEMM of W^T (every CPU GEMM weight is stored [N, K] for it) runs
there instead: measured faster than OpenBLAS on the prefill shapes and as fast on GEMVs
(benchmarks/RESULTS_CPU.md). Everything else still goes to numpy.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .cpu_gemm import Sgemm
from .manifest import KernelSpec, eval_dim


class Gemm:
    """One blas kernel: out[M, N] = a[M, K] @ (w^T if trans_b else w), over 2-D views.

    The view shapes are evaluated once per value of the symbols they use, not per call."""

    def __init__(self, spec: KernelSpec, sgemm: Sgemm | None = None, weight: bool = False):
        self.sgemm = sgemm if spec.scalars[0] else None  # it reads W^T only
        # w is a weight (constant): from Sgemm.PACKED_W_ROWS rows on, llmc's GEMM may read a packed copy
        self.packed = weight and self.sgemm is not None and self.sgemm.packs
        self.args = tuple(t.arg for t in spec.tensors)  # a, w, out
        self.shapes = tuple(t.shape for t in spec.tensors)
        self.trans_b = bool(spec.scalars[0])
        self.symbols = tuple(sorted({name for shape in self.shapes for d in shape if not isinstance(d, int)
                                     for _, monomial in d for name in monomial}))
        self._views: dict[tuple, tuple] = {}

    def __call__(self, args: Sequence[np.ndarray], env: Mapping[str, int]) -> None:
        key = tuple(env[s] for s in self.symbols)
        shapes = self._views.get(key)
        if shapes is None:
            if len(self._views) >= 64:  # a serving process sees many shapes: keep the cache small
                self._views.clear()
            shapes = self._views[key] = tuple(tuple(eval_dim(d, env) for d in shape) for shape in self.shapes)
        a, w, buf = (args[i] for i in self.args)
        a, w, out = a.reshape(shapes[0]), w.reshape(shapes[1]), buf.reshape(shapes[2])
        if not np.may_share_memory(out, buf):  # reshape copied (never for contiguous buffers): results would be lost
            raise ValueError("gemm output is not a view of its buffer")
        if self.sgemm is not None and self.sgemm.takes(a, w, out):
            if self.packed:
                self.sgemm.weight_gemm(a, w, out)
            else:
                self.sgemm(a, w, out)
        else:
            np.matmul(a, w.T if self.trans_b else w, out=out)


__all__ = ["Gemm"]
