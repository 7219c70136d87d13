"""stage_split before/after: the stages of every test family, run together by the multi-rank
interpreter (SEND/RECV between them), give the unsplit step's logits over a ragged prefill and
a decode step; one activation crosses each cut; each stage holds its own layers' KV caches."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import llmc.api
from llmc.compiler.interpret_ranks import RankRun, interpret_ranks
from llmc.compiler.interpreter import interpret
from llmc.compiler.ops import Op
from llmc.errors import LLMCError
from llmc.passes.pipeline import run_pipeline
from llmc.passes.serve import StepSpec, derive_step
from llmc.passes.stage_split import stage_split

pytest.importorskip("transformers")
from causal_lms import FAMILIES, VOCAB, tiny_causal_lm  # noqa: E402


@functools.lru_cache(maxsize=None)
def _step(family: str):
    model = tiny_causal_lm(family, layers=4)
    graph = llmc.api.capture(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 8))},
                             llmc.api.CompileOptions(dim_bounds={"batch": (1, 4), "seq": (1, 48)}))
    return derive_step(run_pipeline(graph)[0], StepSpec(page_size=4, max_tokens=64, max_seqs=4))[0]


def _steps(rng):
    lens = (7, 11)
    table = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)
    seqs = [rng.integers(3, VOCAB, n) for n in lens]
    prefill = {"tokens": np.concatenate(seqs).astype(np.int64),
               "positions": np.concatenate([np.arange(n) for n in lens]).astype(np.int64),
               "logit_rows": np.array([lens[0] - 1, sum(lens) - 1], np.int64), "page_table": table,
               "kv_lens": np.array(lens, np.int32), "q_starts": np.array([0, lens[0], sum(lens)], np.int32)}
    decode = {"tokens": rng.integers(3, VOCAB, 2).astype(np.int64), "positions": np.array(lens, np.int64),
              "logit_rows": np.array([0, 1], np.int64), "page_table": table,
              "kv_lens": np.array([n + 1 for n in lens], np.int32), "q_starts": np.array([0, 1, 2], np.int32)}
    return prefill, decode


def _arrays(graph, step, caches):
    return [step[i.attrs.name] if i.attrs.name in step else caches[i.attrs.name] for i in graph.inputs]


@pytest.mark.parametrize("family,stages", [(f, 2) for f in FAMILIES] + [("llama", 4), ("gpt2", 3)])
def test_stages_together_give_the_unsplit_logits(family, stages):
    before = _step(family)
    staged, report = stage_split(before, stages)
    assert len(staged.stages) == stages and report.counts["sends"] == stages - 1  # the residual stream alone
    whole = {i.attrs.name: np.zeros((16, *[int(d) for d in i.shape[1:]]), i.dtype.numpy) for i in before.inputs[6:]}
    split = {k: v.copy() for k, v in whole.items()}
    for step in _steps(np.random.default_rng(0)):
        want = interpret(before, _arrays(before, step, whole))[0]
        outs = interpret_ranks([RankRun(g, _arrays(g, step, split)) for g in staged.stages])
        np.testing.assert_allclose(outs[-1][0], want, rtol=1e-5, atol=1e-6)
    # each stage reads its own layers' caches and runs its own layers' attention
    for g, (first, last) in zip(staged.stages, staged.layers):
        caches = [i.attrs.name for i in g.inputs if i.attrs.name.startswith("kv_cache.")]
        assert caches == [f"kv_cache.{k}" for k in range(first, last + 1)]
        assert {n.attrs.layer for n in g.nodes() if n.op is Op.PAGED_ATTENTION} == set(range(first, last + 1))
    assert [n.op for n in staged.stages[0].outputs] == [Op.SEND]


def test_bad_stage_counts_are_refused():
    before = _step("llama")
    with pytest.raises(LLMCError, match="at least 5 layers"):
        stage_split(before, 5)
    for bad in (0, -1, 2.0):
        with pytest.raises(LLMCError, match="positive int"):
            stage_split(before, bad)
    assert stage_split(before, 1)[0].stages[0] is before


def test_a_recv_no_one_sends_deadlocks_with_a_clear_error():
    staged, _ = stage_split(_step("llama"), 2)
    step = _steps(np.random.default_rng(1))[0]
    caches = {i.attrs.name: np.zeros((16, *[int(d) for d in i.shape[1:]]), i.dtype.numpy)
              for g in staged.stages for i in g.inputs if i.attrs.name.startswith("kv_cache.")}
    with pytest.raises(LLMCError, match="deadlock"):
        interpret_ranks([RankRun(staged.stages[1], _arrays(staged.stages[1], step, caches))])


def test_sharded_then_cut_give_the_unsplit_logits():
    """tp 2 x pp 2 as the compile builds it: the step sharded, then the sharded program cut into
    stages; rank = stage * 2 + shard, collectives within a stage, SEND / RECV along a shard's
    stages (peers are stage indices in its pipeline group)."""
    from llmc.passes.shard import shard

    before = _step("llama")
    sharded, _ = shard(before, 2)
    staged, report = stage_split(sharded.graph, 2)
    # the all-reduced residual and a partial sum cross the cut: stacked into one message
    assert report.counts["sends"] == 2 and [n.op for n in staged.stages[0].outputs] == [Op.SEND]
    assert [n.op for n in staged.stages[1].nodes()].count(Op.RECV) == 1
    whole = {i.attrs.name: np.zeros((16, *[int(d) for d in i.shape[1:]]), i.dtype.numpy) for i in before.inputs[6:]}
    split = [{i.attrs.name: np.zeros((16, *[int(d) for d in i.shape[1:]]), i.dtype.numpy)
              for i in g.inputs if i.attrs.name.startswith("kv_cache.")} for g in staged.stages for _ in range(2)]
    for step in _steps(np.random.default_rng(1)):
        want = interpret(before, _arrays(before, step, whole))[0]
        runs = [RankRun(g, _arrays(g, step, split[2 * s + r]), group=(2 * s, 2 * s + 1), params=sharded.rank_params[r],
                        pipeline=(r, 2 + r)) for s, g in enumerate(staged.stages) for r in range(2)]
        outs = interpret_ranks(runs)
        for r in (2, 3):
            np.testing.assert_allclose(outs[r][0], want, rtol=1e-5, atol=1e-5)
