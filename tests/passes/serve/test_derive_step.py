"""derive_step before/after: the step graph's signature and ops, its numbers against the
captured forward (interpreted, fresh random ids), and the refusals that name the node."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import llmc.api
from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ops import Op
from llmc.errors import LLMCError
from llmc.passes.pipeline import run_pipeline
from llmc.passes.serve import StepSpec, derive_step

pytest.importorskip("transformers")
from causal_lms import VOCAB, tiny_causal_lm  # noqa: E402

BOUNDS = {"batch": (1, 4), "seq": (1, 48)}


def _fused(model, kwargs=None):
    kwargs = kwargs or {"input_ids": torch.randint(3, VOCAB, (1, 8))}
    graph = llmc.api.capture(model, (), kwargs, llmc.api.CompileOptions(dim_bounds=BOUNDS))
    return run_pipeline(graph)[0]


@pytest.fixture(scope="module")
def llama():
    model = tiny_causal_lm("llama")
    return model, _fused(model)


def test_step_signature_and_ops(llama):
    _, before = llama
    after, report = derive_step(before, StepSpec(page_size=8, max_tokens=64, max_seqs=4))
    names = [i.attrs.name for i in after.inputs]
    assert names == ["tokens", "positions", "logit_rows", "page_table", "kv_lens", "q_starts", "kv_cache.0",
                     "kv_cache.1"]
    assert str(after.inputs[6].type) == "f32[pages, 2, 8, 2, 8]"
    ops = [n.op for n in after.nodes()]
    assert ops.count(Op.PAGED_ATTENTION) == 2 and Op.ATTENTION not in ops and Op.ARANGE not in ops
    assert str(after.outputs[0].type) == f"f32[rows, {VOCAB}]"
    # the LM head reads only the gathered rows: no [tokens, vocab] matrix anywhere
    assert not any(n.shape and n.shape[-1] == VOCAB and "tokens" in str(n.type) for n in after.nodes())
    assert after.symbols["tokens"].hi == 64 and after.symbols["page_cols"].hi == 6  # 48 positions / 8
    assert report.counts == {"paged_attention": 2}
    assert before.symbols.keys() == {"batch", "seq"} and Op.ATTENTION in {n.op for n in before.nodes()}  # untouched
    assert not any(re.search(r"\b(seq|batch)\b", str(n.type)) for n in after.nodes())


def test_step_equals_the_forward_on_a_ragged_prefill(llama):
    """Two sequences in one step against the captured forward of each alone."""
    _, before = llama
    after, _ = derive_step(before, StepSpec(page_size=4, max_tokens=64, max_seqs=4))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, VOCAB, n) for n in (7, 12)]
    caches = [np.zeros((8, 2, 4, 2, 8), np.float32) for _ in range(2)]
    table = np.array([[5, 1, 0, 0], [2, 7, 3, 4]], np.int32)
    inputs = [np.concatenate(seqs).astype(np.int64), np.concatenate([np.arange(len(s)) for s in seqs]),
              np.array([6, 18], np.int64), table, np.array([7, 12], np.int32), np.array([0, 7, 19], np.int32),
              *caches]
    got = interpret(after, inputs)[0]
    for r, s in enumerate(seqs):
        ref = interpret(before, [s[None].astype(np.int64)])[0][0, -1]
        np.testing.assert_allclose(got[r], ref, rtol=1e-5, atol=1e-5)
    assert caches[0][[5, 1]].any() and not caches[0][6].any()  # K/V landed in the sequences' pages only


def test_sliding_window_is_read_off_the_mask():
    after, report = derive_step(_fused(tiny_causal_lm("mistral")))
    assert {n.attrs.window for n in after.nodes() if n.op is Op.PAGED_ATTENTION} == {6}
    assert "sliding window 6" in str(report)


def test_bidirectional_encoder_is_refused():
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    graph = _fused(model)
    with pytest.raises(LLMCError, match="attention at .*bert.*bidirectional|attention at .*bidirectional"):
        derive_step(graph)


class MeanOverSeq(torch.nn.Module):
    """A causal LM that also mixes tokens outside attention (a running mean over the sequence)."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_causal_lm("llama", layers=1)

    def forward(self, input_ids):
        logits = self.lm(input_ids=input_ids, use_cache=False).logits
        return logits - logits.mean(dim=1, keepdim=True)


def test_token_mixing_op_is_refused_naming_the_node():
    with pytest.raises(LLMCError, match="(mean|sum) at .*across the token axis"):
        derive_step(_fused(MeanOverSeq()))


def test_graph_with_attention_mask_input_is_refused():
    model = tiny_causal_lm("llama", layers=1)
    ids = torch.randint(3, VOCAB, (2, 8))
    graph = _fused(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(LLMCError, match="input_ids only"):
        derive_step(graph)


def test_context_above_the_captured_bound_is_refused(llama):
    with pytest.raises(LLMCError, match="max_context 100 exceeds"):
        derive_step(llama[1], StepSpec(max_context=100))


@pytest.mark.parametrize("store", [DType.I8, DType.F8E4M3])
def test_quantized_kv_cache_step(llama, store):
    """kv_store: the caches become uint8 rows (head_dim codes + a float32 scale) and the step's
    logits stay near the float forward's (the codes' rounding is the only difference)."""
    _, before = llama
    after, report = derive_step(before, StepSpec(page_size=4, max_tokens=64, max_seqs=4, kv_store=store))
    assert str(after.inputs[6].type) == "u8[pages, 2, 4, 2, 12]"  # head_dim 8 + 4 scale bytes
    assert {n.attrs.kv_store for n in after.nodes() if n.op is Op.PAGED_ATTENTION} == {store}
    assert f"{store.value} cache" in str(report)
    rng = np.random.default_rng(3)
    seq = rng.integers(3, VOCAB, 10)
    caches = [np.zeros((4, 2, 4, 2, 12), np.uint8) for _ in range(2)]
    inputs = [seq.astype(np.int64), np.arange(10), np.array([9], np.int64), np.array([[3, 0, 2]], np.int32),
              np.array([10], np.int32), np.array([0, 10], np.int32), *caches]
    got = interpret(after, inputs)[0][0]
    ref = interpret(before, [seq[None].astype(np.int64)])[0][0, -1]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < (0.005 if store is DType.I8 else 0.03), err
    assert caches[0][[3, 0, 2]].any() and not caches[0][1].any()


def test_unknown_kv_store_is_refused():
    with pytest.raises(LLMCError, match="KV cache stores"):
        StepSpec(kv_store=DType.I32)
