"""The block manager over a real host PagePool: pages just in time, prefix pages named,
shared and reference-counted, cached pages evicted least recently used, swap round trips."""
from __future__ import annotations

import numpy as np

from llmc.runtime.engine.kv_cache import KvLayout, PagePool
from llmc.runtime.serve.block_manager import BlockManager, SeqKv, page_hash

P = 4


def manager(pages: int = 8, prefix: bool = True) -> BlockManager:
    return BlockManager(PagePool(KvLayout(P, ((2, 3), (1, 5))), pages), prefix)


def run(bm: BlockManager, kv: SeqKv, tokens: list[int]) -> None:
    """As a step would: pages for all tokens, K/V 'written', full pages named."""
    assert bm.grow(kv, len(tokens))
    kv.length = len(tokens)
    bm.name_full_pages(kv, tokens)


def test_pages_come_just_in_time_and_go_back():
    bm = manager()
    kv = SeqKv()
    assert bm.grow(kv, 1) and len(kv.pages) == 1
    assert bm.grow(kv, P) and len(kv.pages) == 1
    assert bm.grow(kv, P + 1) and len(kv.pages) == 2
    assert not bm.grow(kv, 9 * P) and len(kv.pages) == 2  # refused whole: nothing taken
    bm.release(kv)
    assert bm.pool.free_pages == 8 and bm.held_pages == 0


def test_a_prefix_is_shared_not_recomputed_and_survives_its_owner():
    bm = manager()
    prompt = list(range(10, 10 + 3 * P + 1))  # three full pages and one token
    a = SeqKv()
    run(bm, a, prompt)
    b = SeqKv()
    covered = bm.adopt_prefix(b, prompt + [99])
    assert covered == 3 * P and b.pages == a.pages[:3]
    assert bm.shared_pages == 3 and bm.stats.hit_tokens == 3 * P
    bm.release(a)
    bm.release(b)
    assert len(bm.cached) == 3 and bm.available() == 8  # cached pages count as available
    c = SeqKv()
    assert bm.adopt_prefix(c, prompt) == 3 * P  # the whole prompt but its last token
    other = SeqKv()
    assert bm.adopt_prefix(other, [7] + prompt[1:]) == 0  # a different first page names a different chain


def test_the_whole_prompt_is_never_a_hit():
    bm = manager()
    prompt = list(range(2 * P))
    run(bm, SeqKv(), prompt)
    kv = SeqKv()
    assert bm.adopt_prefix(kv, prompt) == P  # the last page holds the token whose logits we need


def test_cached_pages_are_evicted_least_recently_used_first():
    bm = manager(pages=3)
    olds = []
    for first in (1, 2, 3):
        kv = SeqKv()
        run(bm, kv, [first] * P)
        olds.append(kv.pages[0])
        bm.release(kv)
    assert list(bm.cached) == olds
    kv = SeqKv()
    assert bm.grow(kv, P)
    assert kv.pages == [olds[0]] and bm.stats.evicted_pages == 1
    assert bm.adopt_prefix(SeqKv(), [1] * P + [0]) == 0  # its name went with it
    assert bm.adopt_prefix(SeqKv(), [2] * P + [0]) == P


def test_prefix_cache_off_names_nothing():
    bm = manager(prefix=False)
    prompt = list(range(2 * P + 1))
    kv = SeqKv()
    run(bm, kv, prompt)
    assert kv.hashes == [] and bm.adopt_prefix(SeqKv(), prompt) == 0
    bm.release(kv)
    assert bm.pool.free_pages == 8


def test_swap_out_and_in_restores_the_kv_in_fresh_pages():
    bm = manager(pages=6, prefix=False)
    rng = np.random.default_rng(0)
    for c in bm.pool.caches:
        c[...] = rng.standard_normal(c.shape)
    kv = SeqKv()
    tokens = list(range(2 * P + 2))
    run(bm, kv, tokens)
    before = [c[kv.pages].copy() for c in bm.pool.caches]
    sw = bm.swap_out(kv)
    assert kv.pages == [] and bm.pool.free_pages == 6 and sw.pages == 3
    hog = SeqKv()
    assert bm.grow(hog, 2 * P)  # the old pages go to someone else and get overwritten
    for c in bm.pool.caches:
        c[hog.pages] = 0
    assert bm.can_swap_in(sw, sw.length + 1)
    bm.swap_in(kv, sw, tokens)
    assert kv.length == len(tokens) and not set(kv.pages) & set(hog.pages)
    for c, b in zip(bm.pool.caches, before):
        np.testing.assert_array_equal(c[kv.pages], b)


def test_page_names_chain_through_parents():
    a = page_hash(None, [1, 2])
    assert page_hash(a, [3, 4]) != page_hash(None, [3, 4])
    assert page_hash(a, [3, 4]) == page_hash(page_hash(None, [1, 2]), [3, 4])
