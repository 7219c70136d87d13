"""One loaded model called from many threads: every call gets its own working memory, so
each output equals the single-threaded one exactly."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import llmc

SHAPES = [(1, 3), (2, 17), (4, 64), (3, 1), (1, 40)]


def _feed(i: int) -> np.ndarray:
    b, s = SHAPES[i % len(SHAPES)]
    return np.random.default_rng(100 + i).standard_normal((b, s, 16)).astype(np.float32)


def test_eight_threads_mixed_shapes_match_single_thread(mlp_artifact):
    r = llmc.load(mlp_artifact[2])
    n_threads, per_thread = 8, 100
    feeds = [_feed(i) for i in range(n_threads * per_thread)]
    want = [r(x) for x in feeds]  # single-threaded reference, same executor

    def worker(t: int) -> list[int]:
        bad = []
        for i in range(t, len(feeds), n_threads):  # each thread cycles through all shapes
            got = r(feeds[i])
            if not all(np.array_equal(g, w) for g, w in zip(got, want[i])):
                bad.append(i)
        return bad

    with ThreadPoolExecutor(n_threads) as pool:
        bad = [i for b in pool.map(worker, range(n_threads)) for i in b]
    assert bad == [], f"{len(bad)} of {len(feeds)} concurrent calls differ from the single-threaded result"
    assert len(r._pool) >= 1  # workspaces were handed back


def test_outputs_of_one_call_are_not_touched_by_others(mlp_artifact):
    r = llmc.load(mlp_artifact[2])
    x = _feed(1)
    first = r(x)
    keep = [a.copy() for a in first]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: r(_feed(i)), range(40)))
    for a, k in zip(first, keep):
        np.testing.assert_array_equal(a, k)
