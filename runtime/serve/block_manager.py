"""Who holds which KV page: pages taken just in time, shared prefix pages, swap to host.

The block manager sits between the scheduler and the PagePool: the pool owns the cache
arrays and the free list; this owns the bookkeeping on top of it.

- A sequence takes pages as its K/V grows (`grow`), never a worst-case reservation.
- Prefix cache: once a page is full, it is named by hash(parent page's hash, its token
  ids), so a name stands for the whole prefix up to that page. A new sequence whose
  prompt starts with named pages adopts them (reference count + 1) instead of computing
  them. A named page whose last holder leaves stays cached (its K/V intact) on an LRU
  list, counted as available and evicted only when free pages run short.
- Only full pages are shared and a sequence writes only past its last full page, so a
  shared page is never written: no copy-on-write is needed.
- Swap: a preempted sequence's pages are copied to host arrays (`pool.copy_out`) and let
  go; `swap_in` takes fresh pages and copies the K/V back (`pool.copy_in`).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..engine.kv_cache import PagePool


@dataclass
class SeqKv:
    """The pages one sequence holds, how many positions hold K/V, and the names of its full pages."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)


@dataclass
class Swapped:
    """A sequence's K/V on the host while it waits to run again."""

    host: list[np.ndarray]
    length: int
    pages: int


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, found (their K/V not computed again)
    evicted_pages: int = 0


def page_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)  # a collision would hand out wrong K/V: no 64-bit hash()
    h.update(parent or b"root")
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, pool: PagePool, prefix_cache: bool = True):
        self.pool = pool
        self.page = pool.layout.page_size
        self.prefix_cache = prefix_cache
        self.refs: dict[int, int] = {}  # page -> sequences holding it
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # named pages nobody holds, least recent first
        self.stats = PrefixStats()

    # --- capacity
    def available(self) -> int:
        """Pages a sequence can get now: free ones and cached ones nobody holds."""
        return self.pool.free_pages + len(self.cached)

    @property
    def held_pages(self) -> int:
        return len(self.refs)

    @property
    def shared_pages(self) -> int:
        """Pages held by more than one sequence (a prefix computed once, read by several)."""
        return sum(1 for r in self.refs.values() if r > 1)

    def _take(self, n: int) -> list[int]:
        for _ in range(n - self.pool.free_pages):  # evict least recently used cached pages
            p, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(p)]
            self.pool.give_back([p])
            self.stats.evicted_pages += 1
        pages = self.pool.take(n)
        for p in pages:
            self.refs[p] = 1
        return pages

    def _unref(self, p: int) -> None:
        self.refs[p] -= 1
        if self.refs[p] == 0:
            del self.refs[p]
            if p in self.hash_of:
                self.cached[p] = None
            else:
                self.pool.give_back([p])

    # --- growth and release
    def pages_needed(self, kv: SeqKv, length: int) -> int:
        return max(0, self.pool.pages_for(length) - len(kv.pages))

    def grow(self, kv: SeqKv, length: int) -> bool:
        """Room for positions [0, length); False (nothing taken) if there are not enough pages."""
        need = self.pages_needed(kv, length)
        if need > self.available():
            return False
        kv.pages.extend(self._take(need))
        return True

    def release(self, kv: SeqKv) -> None:
        for p in kv.pages:
            self._unref(p)
        kv.pages, kv.length, kv.hashes = [], 0, []

    # --- prefix cache
    def adopt_prefix(self, kv: SeqKv, tokens: list[int]) -> int:
        """Give an empty sequence the cached pages its tokens start with; returns the tokens
        covered. The last token is always left to compute: its logits pick the next token."""
        if not self.prefix_cache or kv.pages:
            return 0
        full = (len(tokens) - 1) // self.page
        self.stats.queried_tokens += full * self.page
        parent = None
        for i in range(full):
            h = page_hash(parent, tokens[i * self.page:(i + 1) * self.page])
            p = self.by_hash.get(h)
            if p is None:
                break
            if p in self.cached:
                del self.cached[p]
                self.refs[p] = 1
            else:
                self.refs[p] += 1
            kv.pages.append(p)
            kv.hashes.append(h)
            parent = h
        kv.length = len(kv.pages) * self.page
        self.stats.hit_tokens += kv.length
        return kv.length

    def name_full_pages(self, kv: SeqKv, tokens: list[int]) -> None:
        """Name the pages that became full (their K/V written) so later sequences can share them."""
        if not self.prefix_cache:
            return
        while len(kv.hashes) < kv.length // self.page:
            i = len(kv.hashes)
            h = page_hash(kv.hashes[-1] if kv.hashes else None, tokens[i * self.page:(i + 1) * self.page])
            kv.hashes.append(h)
            p = kv.pages[i]
            if h not in self.by_hash and p not in self.hash_of:  # else a twin already names this prefix
                self.by_hash[h] = p
                self.hash_of[p] = h

    # --- swap
    def swap_out(self, kv: SeqKv) -> Swapped:
        used = self.pool.pages_for(kv.length)
        out = Swapped(self.pool.copy_out(kv.pages[:used]), kv.length, used)
        self.release(kv)
        return out

    def can_swap_in(self, s: Swapped, length: int) -> bool:
        return max(s.pages, self.pool.pages_for(length)) <= self.available()

    def swap_in(self, kv: SeqKv, s: Swapped, tokens: list[int]) -> None:
        """Fresh pages for a swapped-out sequence, its K/V copied back (can_swap_in checked first)."""
        kv.pages = self._take(s.pages)
        self.pool.copy_in(kv.pages, s.host)
        kv.length, kv.hashes = s.length, []
        self.name_full_pages(kv, tokens)


__all__ = ["BlockManager", "SeqKv", "Swapped", "PrefixStats", "page_hash"]
