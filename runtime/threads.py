"""CPU threads for the runtime: the one place its thread settings are read.

    LLMC_NUM_THREADS   threads for TVM kernels and llmc's CPU GEMM (default: every core;
                       TVM_NUM_THREADS, if set, is honoured too). The BLAS (numpy's OpenBLAS,
                       where llmc's GEMM does not run) sizes its own pool from
                       OPENBLAS_NUM_THREADS when numpy is imported.

TVM's pool and the BLAS's take turns on the same cores, kernel after kernel. A pool that
spins after its work is done steals the cores the next kernel needs: measured on GPT-2,
layer norms after a GEMM ran 30x slower while TVM's workers spun. So TVM's workers go to
sleep as soon as their work is done (TVM_THREAD_POOL_SPIN_COUNT=0, unless the user set it).
OpenBLAS's idle threads keep yielding the processor for up to 2^28 cycles after each GEMM
(OPENBLAS_THREAD_TIMEOUT, read when numpy is imported, so not settable from here). Measured on
the 2-core VM: OPENBLAS_THREAD_TIMEOUT=4 (sleep at once) made MiniLM 8 x 128 1.10-1.24x torch
against 1.36-1.50x by default (four paired runs), but decode-heavy generate 0-15% slower (the
threads' wake-ups per GEMV), so it stays the user's choice (benchmarks/RESULTS_CPU.md).
"""
from __future__ import annotations

import os

from ..errors import LLMCError


def cpu_threads() -> int:
    value = os.environ.get("LLMC_NUM_THREADS") or os.environ.get("TVM_NUM_THREADS")
    if value is None:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise LLMCError(f"LLMC_NUM_THREADS / TVM_NUM_THREADS = {value!r}: expected a positive integer")
    return int(value)


def use_all_cores() -> None:
    """Size TVM's CPU pool (it defaults to half the cores on x86: one thread on a 2-core VM)
    and stop its workers spinning between kernels. Must run before the first kernel."""
    os.environ.setdefault("TVM_NUM_THREADS", str(cpu_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


class KernelThreads:
    """Resizes TVM's CPU pool between calls (TVM's runtime.config_threadpool), for callers
    whose work size swings: a decode step's kernels each touch a few KB, where waking the
    pool's sleeping workers costs more than the work (measured on the trained small Llama:
    1.8 ms per decode step on one thread against 2.2-3.0 ms on two), while a prefill chunk
    wants every core. Process-wide, like the pool itself; `set` only calls TVM on a change."""

    def __init__(self) -> None:
        self.current: int | None = None
        self._config = None

    def set(self, n: int) -> None:
        if n == self.current:
            return
        if self._config is None:
            from .tvm_runtime import import_tvm

            self._config = import_tvm(with_gpu=False).get_global_func("runtime.config_threadpool")
        self._config(-1, n)  # -1: no core pinning, as TVM_NUM_THREADS gives
        self.current = n
