from __future__ import annotations

import pytest

from llmc.errors import InputError, LLMCError
from llmc.runtime.engine.kv_cache import KvExhausted, KvLayout, PagePool, SequenceKv, waste

LAYOUT = KvLayout(16, ((2, 8), (2, 8)))


def test_page_bytes_and_budget():
    assert LAYOUT.page_bytes == 2 * (2 * 16 * 2 * 8 * 4)
    pool = PagePool.from_budget(LAYOUT, LAYOUT.page_bytes * 5 + 7)
    assert pool.num_pages == 5 and pool.caches[0].shape == (5, 2, 16, 2, 8)
    assert pool.caches[0].ctypes.data % 64 == 0 and not pool.caches[1].any()
    with pytest.raises(LLMCError, match="holds no page"):
        PagePool.from_budget(LAYOUT, LAYOUT.page_bytes - 1)


def test_pages_are_taken_as_a_sequence_grows_and_given_back():
    pool = PagePool(LAYOUT, 4)
    a, b = SequenceKv(pool), SequenceKv(pool)
    a.reserve(1)
    assert len(a.pages) == 1 and pool.free_pages == 3
    a.reserve(16)
    assert len(a.pages) == 1
    a.reserve(17)
    b.reserve(20)
    assert pool.free_pages == 0 and not set(a.pages) & set(b.pages)
    a.length, b.length = 17, 20
    assert waste([a, b]) == (64, 37)
    with pytest.raises(KvExhausted, match="exhausted"):
        a.reserve(33)
    assert issubclass(KvExhausted, InputError)
    a.release()
    assert pool.free_pages == 2 and a.pages == [] and a.length == 0
    b.release()
    assert sorted(pool.take(4)) == [0, 1, 2, 3]
