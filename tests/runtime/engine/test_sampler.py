from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.errors import InputError
from llmc.runtime.engine.sampler import SamplingParams, penalize, sample


def test_greedy_is_argmax_first_of_ties():
    x = np.array([0.1, 3.0, -2.0, 3.0], np.float32)
    assert sample(x, SamplingParams(), np.random.default_rng(0), np.empty(0, np.int64)) == 1


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(3)
    x = rng.standard_normal(50).astype(np.float32)
    seen = rng.integers(0, 50, 12)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen)[None], torch.tensor(x)[None])[0].numpy()
    np.testing.assert_allclose(penalize(x.astype(np.float64), seen, 1.3), ref, rtol=1e-6)


def test_sampling_is_seeded_and_respects_top_k_top_p():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(100)
    p = SamplingParams(temperature=1.0, top_k=5)
    draws = [sample(x, p, np.random.default_rng(9), np.empty(0, np.int64)) for _ in range(2)]
    assert draws[0] == draws[1]
    top5 = set(np.argsort(-x)[:5].tolist())
    g = np.random.default_rng(1)
    assert {sample(x, p, g, np.empty(0, np.int64)) for _ in range(300)} <= top5
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6)
    assert sample(x, tiny_p, g, np.empty(0, np.int64)) == int(np.argmax(x))
    # top_p keeps the smallest prefix reaching p: with p = 0.5 of [0.6, 0.3, 0.1] only the first
    probs = np.log(np.array([0.6, 0.3, 0.1]))
    assert {sample(probs, SamplingParams(temperature=1.0, top_p=0.5), g, np.empty(0, np.int64))
            for _ in range(100)} == {0}


@pytest.mark.parametrize("kw", [{"max_new_tokens": 0}, {"max_new_tokens": True}, {"temperature": -1.0},
                                {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0},
                                {"temperature": float("nan")}])
def test_bad_params_are_input_errors(kw):
    with pytest.raises(InputError):
        SamplingParams(**kw)
