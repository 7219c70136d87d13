"""The paged KV cache: one page pool per model, pages lent to sequences on demand.

Each attention layer has a cache array [pages, 2, page_size, kv_heads, head_dim] (K and V
of a page side by side; a quantized cache's rows are bytes, codes + scale: kv_codec.py); a
page index means the same page in every layer, so a sequence owns one list of pages. Pages are taken as a sequence grows and given back when it ends:
the only waste is the unused tail of each sequence's last page (`waste()` measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...errors import InputError, LLMCError
from .kv_codec import storage


class KvExhausted(InputError):
    """Not enough free pages for what was asked."""


@dataclass(frozen=True)
class KvLayout:
    page_size: int
    layers: tuple[tuple[int, int], ...]  # (kv_heads, head_dim) per attention layer
    dtype: str = "float32"

    def cache_shape(self, layer: int, pages: int) -> tuple[tuple[int, ...], str]:
        """One layer's cache array: shape and dtype (a quantized cache stores uint8 rows)."""
        h, d = self.layers[layer]
        dtype, row = storage(self.dtype, d)
        return (pages, 2, self.page_size, h, row), dtype

    @property
    def page_bytes(self) -> int:
        from ..executor import numpy_dtype

        total = 0
        for i in range(len(self.layers)):
            shape, dtype = self.cache_shape(i, 1)
            total += int(np.prod(shape)) * numpy_dtype(dtype).itemsize
        return total

    def to_json(self) -> dict:
        return {"page_size": self.page_size, "dtype": self.dtype, "layers": [list(x) for x in self.layers]}


def _host_zeros(shape: tuple, dtype: str) -> np.ndarray:
    from ..executor import aligned_empty

    c = aligned_empty(shape, dtype)
    c.fill(0)
    return c


class PagePool:
    """The caches and the free list. `kv_memory` bytes decide how many pages there are."""

    # Pages beyond num_pages that no sequence ever owns (a GPU step pads its batch with rows
    # that write their K/V there: step_runner.GpuStep.padded).
    SCRATCH_PAGES = 0

    def __init__(self, layout: KvLayout, num_pages: int, allocate: Callable[[tuple, str], Any] | None = None):
        if num_pages < 1:
            raise LLMCError(f"a KV page pool needs at least one page, got {num_pages}")
        self.layout = layout
        self.num_pages = num_pages
        # `allocate(shape, dtype)` returns a zeroed cache array: host memory by default, device
        # memory for a GPU step function. Zeroed: a step reads whole pages, and garbage NaN in a
        # masked slot would still poison 0 * NaN.
        allocate = allocate or _host_zeros
        self.caches = [allocate(*layout.cache_shape(i, num_pages + self.SCRATCH_PAGES))
                       for i in range(len(layout.layers))]
        self._free = list(range(num_pages - 1, -1, -1))

    @classmethod
    def from_budget(cls, layout: KvLayout, kv_memory: int,
                    allocate: Callable[[tuple, str], Any] | None = None) -> "PagePool":
        pages = int(kv_memory) // layout.page_bytes - cls.SCRATCH_PAGES
        if pages < 1:
            raise LLMCError(f"kv_memory={kv_memory} bytes holds no page (one page of {layout.page_size} tokens over "
                            f"{len(layout.layers)} layers is {layout.page_bytes} bytes)")
        return cls(layout, pages, allocate)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KvExhausted(f"KV cache exhausted: {n} pages wanted, {len(self._free)} of {self.num_pages} free")
        out = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return out

    def give_back(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.layout.page_size)

    # Swapping a preempted sequence out to host memory and back (the serving engine). A device
    # pool overrides both with device<->host copies; the host arrays' layout is its own business.
    def copy_out(self, pages: list[int]) -> list[np.ndarray]:
        """Host copies of these pages' K/V, one array [len(pages), 2, page_size, kv_heads, head_dim] per layer."""
        idx = np.asarray(pages, np.int64)
        return [c[idx] for c in self.caches]  # fancy indexing copies

    def copy_in(self, pages: list[int], host: list[np.ndarray]) -> None:
        """Write what copy_out returned into these pages (as many as were copied out)."""
        idx = np.asarray(pages, np.int64)
        for c, h in zip(self.caches, host):
            if h.shape[0] != idx.size:
                raise LLMCError(f"copy_in: {idx.size} pages given for {h.shape[0]} copied out")
            c[idx] = h


class SequenceKv:
    """The pages one sequence holds and how many of its positions are written."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []
        self.length = 0  # positions whose K/V are in the cache

    def reserve(self, length: int) -> None:
        """Make room for positions [0, length)."""
        need = self.pool.pages_for(length) - len(self.pages)
        if need > 0:
            self.pages.extend(self.pool.take(need))

    def release(self) -> None:
        self.pool.give_back(self.pages)
        self.pages = []
        self.length = 0


def waste(seqs: list[SequenceKv]) -> tuple[int, int]:
    """(slots allocated, slots holding a token) over the given live sequences."""
    alloc = sum(len(s.pages) for s in seqs) * (seqs[0].pool.layout.page_size if seqs else 0)
    return alloc, sum(s.length for s in seqs)


__all__ = ["KvLayout", "PagePool", "SequenceKv", "KvExhausted", "waste"]
