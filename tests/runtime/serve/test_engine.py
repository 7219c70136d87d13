"""The engine without HTTP: its asyncio stream, leaving a stream early, intake checks, the
queue bound, shutdown."""
from __future__ import annotations

import asyncio

import pytest

import llmc
from llmc.errors import InputError
from llmc.runtime.engine.sampler import SamplingParams
from llmc.runtime.serve.engine import Engine, EngineConfig, EngineStopped, QueueFull
from llmc.runtime.serve.scheduler import PreemptionCost


@pytest.fixture(scope="module")
def llm(trained_artifact):
    return llmc.load(trained_artifact)


def test_async_stream_equals_blocking_generate_and_leaving_early_frees_pages(llm):
    engine = Engine(llm, EngineConfig()).start()
    ids = llm.encode("class Stack:\n", 0)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(), n=2, temperature=0.7, seed=4)
    want = engine.generate(ids, params)

    async def stream(stop_after: int | None):
        got = [[], []]
        async for ev in engine.submit_async(ids, params):
            if ev.token_id is not None:
                got[ev.index].append(ev.token_id)
            if stop_after is not None and sum(map(len, got)) == stop_after:
                break
        return got

    assert asyncio.run(stream(None)) == [w.token_ids for w in want]
    assert [w.finish_reason for w in want] == ["length", "length"]
    asyncio.run(stream(3))  # the consumer leaves: the request is aborted
    engine.shutdown(drain=True, timeout=30)
    assert engine.failure is None and engine.snapshot()["kv_pages_used"] == 0
    assert engine.metrics.requests_finished == {"length": 2, "abort": 1}


def test_intake_refuses_what_could_never_finish(llm, trained_artifact):
    engine = Engine(llm, EngineConfig())
    lim = llm.limits
    for prompt, params in (([], SamplingParams()), ([lim.vocab], SamplingParams()),
                           ([1] * lim.max_context, SamplingParams())):
        with pytest.raises(InputError):
            engine.submit(prompt, params, lambda ev: None)
    small = Engine(llmc.load(trained_artifact, kv_memory=2 * llm.layout.page_bytes), EngineConfig())
    with pytest.raises(InputError, match="KV pages"):  # 40 positions need 3 pages of 16; the pool has 2
        small.submit([1] * 30, SamplingParams(max_new_tokens=10), lambda ev: None)
    small.submit([1] * 20, SamplingParams(max_new_tokens=10), lambda ev: None)  # 30 positions fit


@pytest.mark.parametrize("bad", [dict(max_num_seqs=0), dict(max_num_batched_tokens=0), dict(max_queue=0),
                                 dict(max_num_seqs=10**6), dict(policy="lifo"), dict(preemption="drop")])
def test_bad_engine_settings_are_input_errors(llm, bad):
    with pytest.raises(InputError):
        Engine(llm, EngineConfig(**bad))


def test_queue_bound_and_shutdown(llm):
    engine = Engine(llm, EngineConfig(max_queue=3))  # not started: nothing leaves the queue
    for _ in range(3):
        engine.submit([1, 2], SamplingParams(max_new_tokens=2), lambda ev: None)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_new_tokens=2), lambda ev: None)
    engine.start()
    engine.shutdown(drain=True, timeout=30)  # the three queued finish first
    assert engine.metrics.requests_finished == {"length": 3}
    with pytest.raises(EngineStopped):
        engine.submit([1, 2], SamplingParams(max_new_tokens=2), lambda ev: None)


def test_preemption_cost_rule():
    cost = PreemptionCost(copy_bytes_s=1e9, prompt_token_s=1e-4)
    assert cost.choose(tokens=100, nbytes=1 << 20, swap_room=1 << 30) == "swap"  # 2 ms of copies vs 10 ms
    assert cost.choose(tokens=10, nbytes=1 << 20, swap_room=1 << 30) == "recompute"  # vs 1 ms
    assert cost.choose(tokens=100, nbytes=1 << 20, swap_room=1 << 19) == "recompute"  # no host room
    assert PreemptionCost("swap").choose(1, 1 << 30, 1 << 31) == "swap"
    assert PreemptionCost("swap").choose(1, 1 << 30, 1 << 20) == "recompute"
    assert PreemptionCost("recompute").choose(10**6, 1, 1 << 30) == "recompute"
    cost.observe_copy(1 << 30, 0.1)  # measured rates move the estimates
    assert cost.copy_bytes_s > 1e9
