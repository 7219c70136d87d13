"""The serving engine over an int8 KV cache (`kv_cache_dtype="int8"`): many requests queued at
once into a pool of 16 pages, so sequences are preempted both ways (swapped to host memory as
uint8 rows and back, or recomputed); every output equals the same artifact's generate() of that
request alone, except after a near tie, and all pages come back.

Why a near-tie allowance where the float cache's test asks for equality: a batched step computes
K/V by GEMMs of other shapes than a lone sequence's, so the same float may differ in its last
bit, and that can move an int8 code by one step (~max|row| / 127), a far larger change than the
float's. It flips a greedy pick only where two logits are within a few thousandths (measured:
request 2 of this workload, 7.4911 vs 7.4881). Any corruption of pages (swap, recompute, a wrong
page) shows up as a divergence at a clear margin."""
from __future__ import annotations

import pathlib
import sysconfig

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")


def test_preempted_requests_over_an_int8_cache_equal_each_alone(int8_kv_artifact, drive_engine):
    import llmc
    from llmc.runtime.serve.engine import Engine, EngineConfig

    offline = llmc.load(int8_kv_artifact)
    page = offline.layout.page_bytes
    assert offline.layout.dtype == "int8" and page == 4 * 2 * 16 * 2 * 68  # layers x K,V x tokens x heads x row
    ids = offline.encode((pathlib.Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text(), 0)
    rng = np.random.default_rng(11)
    work = []
    for _ in range(24):
        start, length, new = int(rng.integers(100, len(ids) - 200)), int(rng.integers(2, 100)), int(rng.integers(1, 48))
        prompt = ids[start:start + length]
        work.append((prompt, new, offline.generate([prompt], max_new_tokens=new, stop_token_ids=())[0].token_ids))
    engine = Engine(llmc.load(int8_kv_artifact, kv_memory=16 * page),
                    EngineConfig(max_num_batched_tokens=64, swap_space=4 * page))
    got = drive_engine(engine, [(prompt, new) for prompt, new, _ in work])
    assert engine.failure is None
    same = 0
    for (prompt, _, ref), out in zip(work, got):
        if out == ref:
            same += 1
            continue
        j = next(j for j, (a, b) in enumerate(zip(out, ref)) if a != b)
        logits = offline(input_ids=np.array([prompt + ref[:j]]))[0][0, -1]  # the forward: float, no cache
        top = np.sort(logits)[-2:]
        assert top[1] - top[0] < 0.02, (prompt[:6], j, out[j], ref[j], top)  # a near tie, not a wrong page
    assert same >= len(work) - 2, same
    c = engine.scheduler.counts
    assert c.swap > 0 and c.swap_in == c.swap and c.recompute > 0
    assert engine.pool.free_pages + len(engine.blocks.cached) == engine.pool.num_pages
