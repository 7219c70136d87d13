"""Generation end to end on the CPU: real transformers families (tiny, random weights),
compiled by llmc.compile with their step function, against transformers' own generate
(greedy tokens must be identical) and forward (logits within 1e-4 relative)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmc

pytest.importorskip("transformers")
from causal_lms import FAMILIES, VOCAB, hf_greedy, recorded_steps, tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.slow
NEW = 32


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for fam in FAMILIES:
        model = tiny_causal_lm(fam)
        ids = torch.randint(3, VOCAB, (1, 8))
        cm = llmc.compile(model, (), {"input_ids": ids}, dim_bounds={"batch": (1, 4), "seq": (1, 96)},
                          generate=True)
        out[fam] = (model, cm)
    return out


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_transformers_generate(compiled, family):
    model, cm = compiled[family]
    prompts = _prompts(seed=list(FAMILIES).index(family))
    got = cm.generate(prompts, max_new_tokens=NEW, stop_token_ids=())  # three lengths, one batch
    for p, g in zip(prompts, got):
        assert g.token_ids == hf_greedy(model, p, NEW), f"{family}: prompt of {len(p)} tokens"
        assert g.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_step_logits_match_torch_forward(compiled, family):
    """The step function's logits for each sequence's last token, prefill and one decode step,
    against the full forward of the same tokens in torch."""
    model, cm = compiled[family]
    llm = cm._llm or (cm.generate([[3]], max_new_tokens=1) and cm._llm)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (12, 5)]
    with recorded_steps(llm) as seen:
        out = llm.generate(prompts, max_new_tokens=2, stop_token_ids=())
    assert len(seen) == 2  # one prefill step for both prompts, one decode step
    for step, (inputs, logits) in enumerate(seen):
        for r, n in enumerate(inputs["kv_lens"]):  # rows follow the step's order: find each one's prompt
            i = [len(p) + step for p in prompts].index(int(n))
            tokens = prompts[i] + out[i].token_ids[:step]
            with torch.no_grad():
                ref = model(torch.tensor([tokens]), use_cache=False).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[r], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_seeded_sampling_is_reproducible(compiled):
    _, cm = compiled["llama"]
    prompts = _prompts(3)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=11, stop_token_ids=())
    a = [g.token_ids for g in cm.generate(prompts, **kw)]
    b = [g.token_ids for g in cm.generate(prompts, **kw)]
    c = [g.token_ids for g in cm.generate(prompts, **{**kw, "seed": 12})]
    assert a == b
    assert a != c
    alone = cm.generate([prompts[1]], **{**kw, "seed": 12})[0].token_ids  # seed + index: prompt 1 of the batch
    assert alone == cm.generate([prompts[0], prompts[1]], **{**kw, "seed": 11})[1].token_ids


def test_stop_token_ends_a_sequence_early(compiled):
    model, cm = compiled["qwen2"]
    p = _prompts(5)[1]
    ref = hf_greedy(model, p, NEW)
    stop = ref[4]
    first = ref.index(stop)
    out = cm.generate([p, _prompts(6)[0]], max_new_tokens=NEW, stop_token_ids=[stop])
    assert out[0].token_ids == ref[:first + 1] and out[0].finish_reason == "stop"
    assert len(out[1].token_ids) == NEW or out[1].finish_reason == "stop"


def test_stream_yields_the_same_tokens(compiled):
    _, cm = compiled["phi3"]
    prompts = _prompts(8)
    full = cm.generate(prompts, max_new_tokens=10, stop_token_ids=())
    got = [[] for _ in prompts]
    for i, t in cm.generate(prompts, max_new_tokens=10, stop_token_ids=(), stream=True):
        got[i].append(t)
    assert got == [g.token_ids for g in full]


def test_export_load_generate(compiled, tmp_path):
    model, cm = compiled["gpt2"]
    path = cm.export(tmp_path / "gpt2.llmc")
    llm = llmc.load(path, kv_memory=1 << 20)
    prompts = _prompts(9)
    assert [g.token_ids for g in llm.generate(prompts, max_new_tokens=NEW, stop_token_ids=())] == \
        [hf_greedy(model, p, NEW) for p in prompts]
    ids = np.asarray([prompts[1]], np.int64)  # the forward entry point is still there
    with torch.no_grad():
        ref = model(torch.tensor(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(llm(ids)[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompts, kw, match", [
    ([[]], {}, "empty prompt"),
    ([[5, -1, 7]], {}, "outside the vocabulary"),
    ([[5, VOCAB]], {}, "outside the vocabulary"),
    ([[5] * 96], {}, "compiled context"),
    ([[5, 6]], {"max_new_tokens": 0}, "max_new_tokens"),
    ("some text", {}, "no tokenizer"),
    ([[5, 6]], {"top_p": 0.0}, "top_p"),
    ([], {}, "non-empty"),
    ([[5, 6]], {"temperature": "hot"}, "bad sampling argument"),
    ([np.array([5.0, 6.0])], {}, "integer array"),
    ([[5, 6.5]], {}, "must be ints"),
    ([[5, 6]], {"stream": True, "max_new_tokens": 0}, "max_new_tokens"),
    ([[5, -6]], {"stream": True}, "vocabulary"),
])
def test_bad_input_is_an_input_error(compiled, prompts, kw, match):
    _, cm = compiled["llama"]
    with pytest.raises(llmc.InputError, match=match):
        cm.generate(prompts, **kw)
    assert cm.generate([[5, 6]], max_new_tokens=2)[0].token_ids  # and the engine still works


def test_kv_pages_exhausted_is_an_input_error(compiled, tmp_path):
    _, cm = compiled["llama"]
    path = cm.export(tmp_path / "llama.llmc")
    llm = llmc.load(path, kv_memory=llmc.load(path).layout.page_bytes * 2)  # two pages of 16 positions
    with pytest.raises(llmc.InputError, match="KV pages"):
        llm.generate([[5] * 20], max_new_tokens=20)
    # sequences that fit run one after another in the same two pages
    out = llm.generate([[5] * 10, [6] * 12, [7] * 3], max_new_tokens=8, stop_token_ids=())
    assert [len(g.token_ids) for g in out] == [8, 8, 8]
    assert llm.pool.free_pages == 2


def test_kv_waste_is_only_last_pages(compiled):
    _, cm = compiled["mistral"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, int(n)).tolist() for n in rng.integers(2, 60, 12)]
    cm.generate(prompts, max_new_tokens=24, stop_token_ids=())
    st = cm._llm.last_stats
    live = 12  # at the peak every sequence holds at most one partly filled page
    assert st.peak_alloc_slots - st.peak_used_slots < live * cm._llm.layout.page_size


def test_a_stream_left_early_gives_its_pages_back(compiled):
    _, cm = compiled["gemma"]
    cm.generate([[5, 6]], max_new_tokens=1)
    pool = cm._llm.pool
    stream = cm.generate(_prompts(10), max_new_tokens=20, stop_token_ids=(), stream=True)
    for n, _ in enumerate(stream):
        if n == 4:
            break
    assert pool.used_pages > 0  # the generator is suspended, still holding its sequences
    stream.close()
    assert pool.used_pages == 0
    assert len(cm.generate([[5, 6]], max_new_tokens=3, stop_token_ids=())[0].token_ids) == 3


def test_model_compiled_with_a_mask_still_generates():
    """The forward takes ids and a mask; generate() recaptures the model with the ids alone."""
    model = tiny_causal_lm("qwen2", seed=3, layers=1)
    ids = torch.randint(3, VOCAB, (2, 7))
    cm = llmc.compile(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      dim_bounds={"batch": (1, 4), "seq": (1, 48)})
    assert cm.input_names == ["input_ids", "attention_mask"]
    prompts = _prompts(12)
    assert [g.token_ids for g in cm.generate(prompts, max_new_tokens=16, stop_token_ids=())] == \
        [hf_greedy(model, p, 16) for p in prompts]
