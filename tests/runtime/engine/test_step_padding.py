"""GpuStep.padded: a decode batch padded to a bucket size (runtime/engine/step_runner.py).

The padding is plain host arithmetic, so it is checked here on the CPU step function, which
reads the same inputs: the padded step must give the real rows the logits the unpadded step
gives them, and write nothing outside the real sequences' pages but the scratch page."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import llmc
from llmc.runtime.engine.kv_cache import PagePool
from llmc.runtime.engine.step_runner import DECODE_BUCKETS, GpuStep
from llmc.runtime.executor import aligned_empty

pytest.importorskip("transformers")
from causal_lms import VOCAB, tiny_causal_lm  # noqa: E402


class ScratchPool(PagePool):
    SCRATCH_PAGES = 1  # as DevicePagePool's, in host memory


def _padder(max_seqs: int, max_context: int = 256, page_size: int = 16) -> GpuStep:
    return GpuStep(types.SimpleNamespace(graphs=False), max_context, page_size, max_seqs)


def _decode_inputs(seqs: int, rng) -> dict:
    lens = rng.integers(1, 40, seqs).astype(np.int32)
    return {"tokens": rng.integers(0, 50, seqs), "positions": (lens - 1).astype(np.int64),
            "logit_rows": np.arange(seqs, dtype=np.int64),
            "page_table": rng.integers(0, 9, (seqs, 3)).astype(np.int32), "kv_lens": lens,
            "q_starts": np.arange(seqs + 1, dtype=np.int32)}


def test_buckets_and_limits():
    step = _padder(max_seqs=40)
    assert [step.bucket(n) for n in (1, 3, 5, 16, 17, 33, 40)] == [1, 4, 8, 16, 24, 40, 40]
    assert list(DECODE_BUCKETS) == sorted(DECODE_BUCKETS)


def test_decode_step_padded_to_a_bucket(rng=np.random.default_rng(0)):
    step = _padder(max_seqs=32)
    step._scratch = 9
    x = _decode_inputs(5, rng)
    y = step.padded(x)
    assert y["tokens"].size == y["page_table"].shape[0] == y["kv_lens"].size == y["logit_rows"].size == 8
    assert y["q_starts"].tolist() == list(range(9))
    np.testing.assert_array_equal(y["page_table"][:5, :3], x["page_table"])
    assert y["page_table"].shape[1] == 8  # MIN_COLS
    assert (y["page_table"][5:, 0] == 9).all() and (y["page_table"][5:, 1:] == 0).all()
    assert (y["kv_lens"][5:] == 1).all() and (y["positions"][5:] == 0).all()
    np.testing.assert_array_equal(y["logit_rows"], np.arange(8))


def test_mixed_step_is_not_padded(rng=np.random.default_rng(1)):
    step = _padder(max_seqs=32)
    x = _decode_inputs(3, rng)
    x["tokens"] = np.concatenate([x["tokens"], [1, 2]])  # the last sequence brings 3 tokens
    x["positions"] = np.concatenate([x["positions"], [5, 6]])
    x["q_starts"] = np.array([0, 1, 2, 5], np.int32)
    y = step.padded(x)
    assert y["tokens"].size == 5 and y["page_table"].shape[0] == 3


def test_padded_rows_leave_the_real_rows_alone(tmp_path):
    """Three sequences prefilled, then one decode step run unpadded and padded to 4 rows on
    copies of the same caches: same logits for the real rows, same real pages after."""
    rng = np.random.default_rng(2)
    model = tiny_causal_lm("llama", layers=2)
    cm = llmc.compile(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 6))},
                      dim_bounds={"batch": (1, 2), "seq": (1, 48)}, generate=True)
    llm = llmc.load(cm.export(tmp_path / "m.llmc"))
    run = llm.step.executor
    pool = ScratchPool.from_budget(llm.layout, 16 * llm.layout.page_bytes)
    lens = [5, 19, 3]
    pages = [pool.take(pool.pages_for(n + 1)) for n in lens]
    table = np.zeros((3, max(map(len, pages))), np.int32)
    for r, p in enumerate(pages):
        table[r, :len(p)] = p
    prompt = [rng.integers(3, VOCAB, n) for n in lens]
    caches = {f"kv_cache.{i}": c for i, c in enumerate(pool.caches)}
    run(tokens=np.concatenate(prompt).astype(np.int64),
        positions=np.concatenate([np.arange(n) for n in lens]).astype(np.int64),
        logit_rows=np.cumsum(lens).astype(np.int64) - 1, page_table=table,
        kv_lens=np.asarray(lens, np.int32), q_starts=np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
        **caches)
    decode = {"tokens": rng.integers(3, VOCAB, 3).astype(np.int64), "positions": np.asarray(lens, np.int64),
              "logit_rows": np.arange(3, dtype=np.int64), "page_table": table,
              "kv_lens": np.asarray(lens, np.int32) + 1, "q_starts": np.arange(4, dtype=np.int32)}
    plain = {}
    for k, c in caches.items():  # aligned as the pool's: the kernels write state in place only then
        plain[k] = aligned_empty(c.shape, c.dtype)
        plain[k][...] = c
    want = run(**decode, **plain)[0]
    step = GpuStep(types.SimpleNamespace(graphs=False), llm.spec.max_context, llm.spec.page_size,
                   llm.spec.max_seqs)
    step._scratch = pool.num_pages
    padded = step.padded(decode)
    assert padded["tokens"].size == 4
    got = run(**padded, **caches)[0]
    assert got.shape[0] == 4
    np.testing.assert_allclose(got[:3], want, rtol=1e-5, atol=1e-5)
    for k in caches:  # every page but the scratch one is as the unpadded step left it
        np.testing.assert_array_equal(caches[k][:pool.num_pages], plain[k][:pool.num_pages])
