"""`llmc.compile(..., kv_cache_dtype="int8" | "fp8")`: the artifact's KV cache holds codes and
a scale per token and head; a prompt read in two chunks (the second attending over the
first's quantized pages) gives logits near the float forward's; generate() runs; the pool
holds ~2.7x the pages in the same memory; bad requests are refused before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmc
from llmc.runtime.engine.kv_cache import SequenceKv
from llmc.runtime.engine.step_inputs import step_inputs

pytest.importorskip("transformers")
from causal_lms import VOCAB, tiny_causal_lm  # noqa: E402

BOUNDS = {"batch": (1, 2), "seq": (1, 48)}


class _Seq:
    def __init__(self, tokens, pool):
        self.tokens, self.kv = tokens, SequenceKv(pool)


def _chunked_prefill(llm, prompt, cut):
    """The last row's logits after reading prompt[:cut], then prompt[cut:], through the step."""
    s = _Seq(list(prompt), llm.pool)
    s.kv.reserve(len(prompt))
    try:
        for n in (cut, len(prompt) - cut):
            inputs, _ = step_inputs([(s, n)], llm.pool)
            logits = llm.step_logits(inputs)
            s.kv.length += n
        return logits[0]
    finally:
        s.kv.release()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


@pytest.mark.parametrize("kv,tol", [("int8", 0.005), ("fp8", 0.03)])
def test_quantized_cache_artifact(model, tmp_path, kv, tol):
    cm = llmc.compile(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 6))}, dim_bounds=BOUNDS,
                      kv_cache_dtype=kv)
    llm = llmc.load(cm.export(tmp_path / f"{kv}.llmc"))
    store = {"int8": "int8", "fp8": "float8_e4m3fn"}[kv]
    assert llm.spec.kv_dtype == store and llm.layout.dtype == store
    shape, dtype = llm.layout.cache_shape(0, 3)
    assert dtype == "uint8" and shape[-1] == llm.spec.layers[0].head_dim + 4
    rng = np.random.default_rng(7)
    for n, cut in ((20, 12), (33, 17)):
        prompt = rng.integers(3, VOCAB, n)
        ref = llm(input_ids=prompt[None])[0][0, -1]  # the forward: no cache at all
        got = _chunked_prefill(llm, prompt, cut)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert 0 < err < tol, err  # near, and not bit-equal: the cache really is quantized
    out = llm.generate([rng.integers(3, VOCAB, 9).tolist(), rng.integers(3, VOCAB, 4).tolist()], max_new_tokens=6)
    assert [len(o.token_ids) for o in out] == [6, 6]
    assert all(0 <= t < VOCAB for o in out for t in o.token_ids)


def test_pool_holds_more_pages_in_the_same_memory(model, tmp_path):
    kw = dict(dim_bounds=BOUNDS, generate=True)
    ids = {"input_ids": torch.randint(3, VOCAB, (1, 6))}
    plain = llmc.load(llmc.compile(model, (), ids, **kw).export(tmp_path / "f.llmc"), kv_memory=1 << 20)
    quant = llmc.load(llmc.compile(model, (), ids, kv_cache_dtype="int8", **kw).export(tmp_path / "q.llmc"),
                      kv_memory=1 << 20)
    d = plain.spec.layers[0].head_dim
    assert quant.layout.page_bytes * 4 * d == plain.layout.page_bytes * (d + 4)  # fp32 rows -> d + 4 bytes
    assert quant.pool.num_pages > 2 * plain.pool.num_pages


@pytest.mark.parametrize("kw,msg", [
    ({"kv_cache_dtype": "int4"}, "unknown KV cache dtype 'int4'"),
    ({"kv_cache_dtype": "int8", "generate": False}, "belongs to the step function"),
    ({"kv_cache_dtype": "fp8", "target": "rocm:gfx942"}, "runs on the CPU and CUDA backends"),
])
def test_bad_requests_are_refused_before_capture(kw, msg):
    class Boom(torch.nn.Module):
        def forward(self, input_ids):
            raise AssertionError("captured: the check came too late")

    with pytest.raises(llmc.LLMCError, match=msg):
        llmc.compile(Boom(), (), {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, **kw)
