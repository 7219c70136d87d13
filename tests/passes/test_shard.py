"""shard before/after: the rank programs of every test family, run together by the multi-rank
interpreter, give the unsharded graph's outputs (fresh random ids, a ragged prefill of two
sequences and then a decode step over the caches each rank filled), and the cut is Megatron's."""
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
from llmc.passes.shard import shard
from llmc.passes.shard_layout import shard_array

pytest.importorskip("transformers")
from causal_lms import FAMILIES, VOCAB, tiny_causal_lm  # noqa: E402

BOUNDS = {"batch": (1, 4), "seq": (1, 48)}
PAGE = 4


def _fused(model):
    graph = llmc.api.capture(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 8))},
                             llmc.api.CompileOptions(dim_bounds=BOUNDS))
    return run_pipeline(graph)[0]


@functools.lru_cache(maxsize=None)
def _step(family: str, kv_heads: int = 4, wide: bool = False):
    shape = {"hidden_size": 128, "head_dim": 32, "intermediate_size": 256} if wide else {}
    return derive_step(_fused(tiny_causal_lm(family, num_key_value_heads=kv_heads, **shape)),
                       StepSpec(page_size=PAGE, max_tokens=64, max_seqs=4))[0]


def _caches(graph):
    return [np.zeros((16, *[int(d) for d in c.shape[1:]]), c.dtype.numpy) for c in graph.inputs[6:]]


def _two_steps(run, rng):
    """Prefill two sequences of different lengths in one step, then decode one token of each;
    `run(step_inputs)` -> logits. Returns both steps' logits."""
    lens = (7, 11)
    seqs = [rng.integers(3, VOCAB, n) for n in lens]
    table = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)
    prefill = [np.concatenate(seqs).astype(np.int64), np.concatenate([np.arange(n) for n in lens]).astype(np.int64),
               np.array([lens[0] - 1, sum(lens) - 1], np.int64), table, np.array(lens, np.int32),
               np.array([0, lens[0], sum(lens)], np.int32)]
    decode = [rng.integers(3, VOCAB, 2).astype(np.int64), np.array(lens, np.int64), np.array([0, 1], np.int64), table,
              np.array([n + 1 for n in lens], np.int32), np.array([0, 1, 2], np.int32)]
    return run(prefill), run(decode)


def _compare(before, world, seed=0):
    after, report = shard(before, world)
    whole = _caches(before)
    ranks = [_caches(after.graph) for _ in range(world)]

    def run_whole(inputs):
        return interpret(before, inputs + whole)[0]

    def run_ranks(inputs):
        outs = interpret_ranks([RankRun(after.graph, inputs + ranks[r], params=after.rank_params[r])
                                for r in range(world)])
        for o in outs[1:]:
            np.testing.assert_array_equal(o[0], outs[0][0])  # every rank ends with the same logits
        return outs[0][0]

    want = _two_steps(run_whole, np.random.default_rng(seed))
    got = _two_steps(run_ranks, np.random.default_rng(seed))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    return after, report


@pytest.mark.parametrize("family,world", [(f, 2) for f in FAMILIES] + [("llama", 4), ("gpt2", 4)])
def test_rank_programs_combined_give_the_unsharded_logits(family, world):
    before = _step(family)
    after, report = _compare(before, world)
    c = report.counts
    # Megatron's cut: per layer q|k|v and gate|up (or fc) column-parallel, o_proj and down row-parallel,
    # one all-reduce after each and one after the (vocabulary-split) embeddings; the LM head split
    # by vocabulary and gathered once at the output
    assert c["row_parallel"] == 4 and c["column_parallel"] == 5 and c["attention_by_heads"] == 2
    assert c["all_gather"] == 1 and c["all_reduce"] == 5
    whole = sum(a.nbytes for a in before.params.values())
    assert after.weight_bytes() < 1.1 * whole / world  # only norms and row-parallel biases are whole


def test_the_cut_in_the_printed_ir():
    before = _step("llama")
    after, _ = shard(before, 2)
    text = str(after.graph)
    assert text.count("all_reduce{world=2}") == 5 and text.count("all_gather{world=2}") == 1
    assert "%kv_cache.0: f32[pages, 2, 4, 2, 8]" in text  # each rank's pages hold its 2 of the 4 kv heads
    assert "%kv_cache.0: f32[pages, 2, 4, 4, 8]" in str(before)  # the pass is pure: the input graph is untouched
    q = next(n for n in after.graph.nodes() if n.op is Op.PAGED_ATTENTION).inputs[0]
    assert str(q.type) == "f32[1, 2, tokens, 8]"  # 2 of 4 query heads
    lm = [n for n in after.graph.nodes() if n.op is Op.MATMUL][-1]
    assert str(lm.type) == f"f32[1, rows, {VOCAB // 2}]"


def test_merged_qkv_is_split_per_segment():
    """q|k|v merged into one weight: each rank's columns are its q heads, then its k, then its v."""
    before = _step("llama")
    after, _ = shard(before, 2)
    name = next(k for k in before.params if "q_proj+k_proj+v_proj" in k)
    w = before.params[name]  # [32, 32 + 32 + 32] (4 kv heads of 8)
    got = after.rank_params[1][name]
    np.testing.assert_array_equal(got, np.concatenate([w[:, 16:32], w[:, 48:64], w[:, 80:96]], axis=1))
    np.testing.assert_array_equal(shard_array(w, 1, (32, 32, 32), 2, 1), got)


def test_kv_heads_the_group_cannot_split_run_replicated_and_stay_exact():
    before = _step("llama", kv_heads=2)  # 2 kv heads over 4 ranks
    _, report = _compare(before, 4, seed=1)
    assert report.counts.get("attention_by_heads", 0) == 0 and "gathered for" in str(report)


def test_a_group_that_divides_nothing_is_still_exact():
    _, report = _compare(_step("qwen2"), 3, seed=2)  # 96 vocab, 4 heads, 64 hidden: only the vocabulary splits by 3
    assert report.counts.get("attention_by_heads", 0) == 0


def test_the_forward_graph_with_full_attention_shards_too():
    model = tiny_causal_lm("phi3", num_key_value_heads=4)
    before = _fused(model)
    after, report = shard(before, 2)
    assert report.counts["attention_by_heads"] == 2
    ids = np.random.default_rng(3).integers(3, VOCAB, (2, 13)).astype(np.int64)
    want = interpret(before, [ids])[0]
    with torch.no_grad():
        hf = model(torch.from_numpy(ids)).logits.numpy()
    outs = interpret_ranks([RankRun(after.graph, [ids], params=after.rank_params[r]) for r in range(2)])
    np.testing.assert_allclose(outs[0][0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[1][0], hf, rtol=1e-3, atol=1e-4)


def test_bad_group_sizes_are_refused():
    before = _step("llama")
    for bad in (0, -2, 1.5):
        with pytest.raises(LLMCError, match="group size"):
            shard(before, bad)
    assert shard(before, 1)[0].graph is before
    with pytest.raises(LLMCError, match="already sharded"):
        shard(shard(before, 2)[0].graph, 2)


@pytest.mark.parametrize("kind,group,symmetric", [("int8", 128, True), ("int4", 32, False)])
def test_quantized_matmuls_shard_like_matmuls(kind, group, symmetric):
    """Weight-only quantized projections (packed int4 with zeros, per-channel int8) split by
    output channels and by whole groups of input channels; the ranks still give the unsharded
    quantized step's logits."""
    from llmc.passes.quantize import quantize_weights
    from llmc.passes.quant.scheme import QuantScheme

    # wide enough that each rank's half of every K holds whole groups of 32
    before, _ = quantize_weights(_step("llama", wide=True), QuantScheme(kind=kind, group=group, symmetric=symmetric))
    after, report = _compare(before, 2, seed=4)
    assert report.counts["row_parallel"] == 4 and report.counts["column_parallel"] >= 4
    assert sum(n.op is Op.QMATMUL for n in after.graph.nodes()) == sum(n.op is Op.QMATMUL for n in before.nodes())


def test_w8a8_matmuls_split_by_columns_only():
    """W8A8 (int8 activations, each row scaled by its max over the whole K) splits by output
    channels; a K-split would scale each rank's slice by its own max, so those run replicated on
    the gathered input, and the ranks still give the unsharded step's logits."""
    from llmc.passes.quantize import quantize_weights
    from llmc.passes.quant.scheme import QuantScheme

    before, _ = quantize_weights(_step("llama", wide=True), QuantScheme(kind="w8a8"))
    after, report = _compare(before, 2, seed=6)
    assert report.counts.get("row_parallel", 0) == 0 and report.counts["column_parallel"] >= 4
    assert sum(n.op is Op.QMATMUL and n.attrs.act_bits == 8 for n in after.graph.nodes()) == \
        sum(n.op is Op.QMATMUL for n in before.nodes())
