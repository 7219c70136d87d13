"""Where a step function runs: the host (an Executor) or a GPU (a GpuExecutor).

A runner makes the page pool (`make_pool`, sized by `default_kv_memory` unless the caller
says), takes it once it exists (`bind_pool`) and runs one step: `runner(inputs) -> logits [rows, vocab]`
as float32 numpy, `inputs` as TokenLoop builds them (runtime/engine/generate.py).

On the GPU the KV pages stay on the device: the pool's caches are bound to the step
executor's inputs for good (GpuExecutor.bind_state), so a step copies only the token ids and
the page metadata in. The page table is padded to a power-of-two width (GpuStep.columns), so a
decode step's shapes, and with them its captured CUDA graph, change only a few times while
the sequences grow; only
steps of up to GRAPH_MAX_TOKENS tokens are captured (a prefill chunk's length changes from
step to step, and capturing each would cost more than it saves), and decode steps (one token per
sequence) of up to GRAPH_MAX_SEQS sequences. A serving engine's decode batch changes size at
nearly every step as requests come and go: padded to one of DECODE_BUCKETS sequences (rows that
write into the pool's scratch page and whose logits are dropped), it meets a handful of shapes
instead of one per size, each captured once (vLLM pads its decode batches the same way).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..threads import KernelThreads, cpu_threads
from .kv_cache import KvLayout, PagePool

DEFAULT_KV_MEMORY = 512 << 20  # host pool, bytes
GPU_KV_FRACTION = 0.5  # of the free device memory, for a GPU pool
SMALL_STEP_TOKENS = 32  # host steps of at most this many tokens run TVM's kernels on one thread (threads.py)
GRAPH_MAX_TOKENS = 64
GRAPH_MAX_SEQS = 256
DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_COLS = 8  # page-table columns of the smallest bucket (128 tokens of 16-token pages)


class CpuStep:
    """The step function in this process's memory, on the CPU."""

    device = "cpu"

    def __init__(self, executor):
        self.executor = executor
        self._threads = KernelThreads()
        self._all_threads = cpu_threads()

    def default_kv_memory(self) -> int:
        return DEFAULT_KV_MEMORY

    def make_pool(self, layout: KvLayout, kv_memory: int) -> PagePool:
        return PagePool.from_budget(layout, kv_memory)  # zeroed host arrays (kv_cache.py says why)

    def bind_pool(self, pool) -> None:
        pass  # the caches travel with every call (numpy arrays, no copy)

    def __call__(self, inputs: dict) -> np.ndarray:
        self._threads.set(1 if inputs["tokens"].size <= SMALL_STEP_TOKENS else self._all_threads)
        return self.executor(**inputs)[0]

    def greedy(self, inputs: dict) -> np.ndarray:
        """Each logits row's argmax [rows] (the first of equal maxima)."""
        return np.argmax(self(inputs), axis=1)

    def done(self) -> None:
        if self._threads.current is not None:
            self._threads.set(self._all_threads)  # the pool as every other caller expects it


class GpuStep:
    """The step function on a GPU (runtime/gpu.py: GpuExecutor), its KV pages on the device."""

    device = "cuda"

    def __init__(self, executor, max_context: int, page_size: int, max_seqs: int):
        self.executor = executor
        self.cols = -(-max_context // page_size)  # page-table columns of the whole context
        self.max_seqs = max_seqs
        executor.graphs = executor.graphs and _graph_worthy
        self._caches: list = []
        self._scratch = 0  # the pool's scratch page (bind_pool)

    def allocate(self, shape: tuple, dtype: str) -> Any:
        # not zeroed: the kernel reads only written positions (llmc_paged_attention.cu)
        return self.executor.tvm.runtime.empty(shape, dtype, self.executor.dev)

    def default_kv_memory(self) -> int:
        import ctypes

        from ..cuda_graph import check, cudart

        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        check(cudart().cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return int(free.value * GPU_KV_FRACTION)

    def make_pool(self, layout: KvLayout, kv_memory: int) -> PagePool:
        return DevicePagePool.from_budget(layout, kv_memory, self.allocate)

    def bind_pool(self, pool) -> None:
        self._scratch = pool.num_pages  # DevicePagePool.SCRATCH_PAGES: the page after the last
        self._caches = list(pool.caches)
        self.executor.bind_state({f"kv_cache.{i}": c for i, c in enumerate(self._caches)})

    def columns(self, need: int) -> int:
        """Page-table width for a step whose longest sequence holds `need` pages: the next power
        of two (at least MIN_COLS), at most the whole context. Shapes (and captured graphs) then
        change only a few times as sequences grow, and the decode kernel, which sizes its key
        splits from the table's width (it cannot read the lengths on the host), does not split
        a 500-token history as finely as an 8k one."""
        cols = MIN_COLS
        while cols < need:
            cols *= 2
        return min(cols, self.cols)

    def bucket(self, seqs: int) -> int:
        """How many sequences a decode step of `seqs` runs as: the next of DECODE_BUCKETS, at most
        the step function's limit."""
        return min(next((b for b in DECODE_BUCKETS if b >= seqs), seqs), self.max_seqs)

    def padded(self, inputs: dict) -> dict:
        """The step's inputs with the page table widened to `columns` (zeros: never read) and a
        decode step's batch padded to `bucket` sequences: each extra row is one token at
        position 0 whose K/V goes to the scratch page and whose logits row is dropped."""
        table, tokens = inputs["page_table"], inputs["tokens"]
        seqs = table.shape[0]
        pad = self.bucket(seqs) - seqs if tokens.size == seqs and inputs["logit_rows"].size == seqs else 0
        cols = self.columns(table.shape[1])
        if table.shape[1] == cols and not pad:
            return inputs
        wide = np.zeros((seqs + pad, cols), np.int32)
        wide[:seqs, :table.shape[1]] = table
        if not pad:
            return {**inputs, "page_table": wide}
        wide[seqs:, 0] = self._scratch
        extra = np.arange(seqs, seqs + pad)
        return {**inputs, "page_table": wide,
                "tokens": np.concatenate([tokens, np.zeros(pad, tokens.dtype)]),
                "positions": np.concatenate([inputs["positions"], np.zeros(pad, inputs["positions"].dtype)]),
                "logit_rows": np.concatenate([inputs["logit_rows"], extra.astype(inputs["logit_rows"].dtype)]),
                "kv_lens": np.concatenate([inputs["kv_lens"], np.ones(pad, np.int32)]),
                "q_starts": np.concatenate([inputs["q_starts"], np.arange(seqs + 1, seqs + pad + 1, dtype=np.int32)])}

    def __call__(self, inputs: dict) -> np.ndarray:
        rows = inputs["logit_rows"].size
        out = self.executor.run(**self.padded(inputs))[0]
        return out[:rows].astype(np.float32)

    def greedy(self, inputs: dict) -> np.ndarray:
        """Each logits row's argmax [rows], computed on the device: the logits never leave it."""
        rows = inputs["logit_rows"].size
        logits = self.executor.run(**self.padded(inputs), outputs="device")[0]
        return self.executor.argmax_rows(logits)[:rows]

    def done(self) -> None:
        pass


def _graph_worthy(env: dict) -> bool:
    """Capture a CUDA graph for small steps and for decode steps (padded to a few sizes)."""
    tokens = env.get("tokens", 0)
    return tokens <= GRAPH_MAX_TOKENS or (tokens == env.get("seqs") and tokens <= GRAPH_MAX_SEQS)


class DevicePagePool(PagePool):
    """A page pool whose caches are device tensors: swapping pages out to host memory and back
    (the serving engine's preemption) copies each page with cudaMemcpy. A page of one layer is
    one contiguous block of the cache [pages, 2, P, Hkv, D]. The step executor synchronizes its
    stream before it returns, so the pages are final when the engine copies them. One page past
    the last is scratch, for the rows GpuStep pads a decode batch with."""

    SCRATCH_PAGES = 1

    def _page_copies(self, pages: list[int], host: list[np.ndarray], to_host: bool) -> None:
        import ctypes

        from ..cuda_graph import check, cudart

        rt = cudart()
        for c, h in zip(self.caches, host):
            nbytes = h.nbytes // max(len(pages), 1)
            base = c.data_ptr()
            for j, page in enumerate(pages):
                dev = ctypes.c_void_p(base + page * nbytes)
                hst = ctypes.c_void_p(h.ctypes.data + j * nbytes)
                if to_host:
                    check(rt.cudaMemcpy(hst, dev, nbytes, 2), "cudaMemcpy (page to host)")
                else:
                    check(rt.cudaMemcpy(dev, hst, nbytes, 1), "cudaMemcpy (page to device)")

    def copy_out(self, pages: list[int]) -> list[np.ndarray]:
        from ..executor import numpy_dtype

        host = [np.empty((len(pages), *tuple(c.shape)[1:]), numpy_dtype(str(c.dtype))) for c in self.caches]
        self._page_copies(pages, host, to_host=True)
        return host

    def copy_in(self, pages: list[int], host: list[np.ndarray]) -> None:
        from ...errors import LLMCError

        for h in host:
            if h.shape[0] != len(pages) or not h.flags.c_contiguous:
                raise LLMCError(f"copy_in: {len(pages)} pages given for {h.shape[0]} copied out")
        self._page_copies(pages, host, to_host=False)


__all__ = ["CpuStep", "GpuStep", "DevicePagePool", "DEFAULT_KV_MEMORY", "GRAPH_MAX_TOKENS", "DECODE_BUCKETS"]
