"""`llmc serve`'s OpenAI API through the real openai client on loopback: completions and
chat, streamed and not, stop, max_tokens, logprobs, seed, n; greedy text identical to
offline llm.generate; each error code in OpenAI's error shape."""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import openai
import pytest
from serving import metric, serving

from llmc.runtime.serve.chat import DEFAULT_TEMPLATE, ChatTemplate
from llmc.runtime.serve.engine import EngineConfig

KEY = "sk-test"
PROMPTS = ["import os\n", "def __init__(self, name, value=None):\n    ", "class Stack:\n    \"\"\"A stack.\"\"\"\n\n"]


@pytest.fixture(scope="module")
def server(trained_artifact):
    with serving(trained_artifact, EngineConfig(), api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completion_equals_offline_generate(server, client, offline, stream):
    for p in PROMPTS:
        ref = offline.generate([p], max_new_tokens=24)[0]  # the model's end-of-sequence id stops both
        r = client.completions.create(model=server.model, prompt=p, max_tokens=24, temperature=0, stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
            assert len(chunks) >= 2 and all(c.choices[0].finish_reason is None for c in chunks[:-1])
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
            assert r.usage.prompt_tokens == len(offline.encode(p, 0))
            assert r.usage.completion_tokens == len(ref.token_ids)
        assert text == ref.text
        assert finish == ref.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline_generate_over_the_template(server, client, offline, stream):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def main("}]
    prompt = ChatTemplate(DEFAULT_TEMPLATE).render(messages)
    assert "<|user|>\ndef main(\n" in prompt and prompt.endswith("<|assistant|>\n")
    ref = offline.generate([prompt], max_new_tokens=20)[0]
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0,
                                       stream=stream)
    if stream:
        chunks = list(r)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.choices[0].message.role == "assistant"
    assert text == ref.text and finish == ref.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server, client, offline, stream):
    full = offline.generate([PROMPTS[1]], max_new_tokens=40, stop_token_ids=())[0].text
    # 3 characters from the middle on of what greedy decoding says, not all blanks (the trained
    # model's text differs between trainings: it may indent there)
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 2) if full[i:i + 3].strip())
    assert full.index(stop) > 0
    r = client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop],
                                  stream=stream, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(r)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:full.index(stop)]
    assert finish == "stop"


def test_max_tokens_and_length(server, client):
    r = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=7, temperature=0.8, seed=1,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.usage.completion_tokens == 7 and len(r.choices[0].token_ids) == 7
    assert r.choices[0].finish_reason == "length"


def test_logprobs_are_the_models(server, client, offline):
    r = client.completions.create(model=server.model, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    ids = offline.encode(PROMPTS[2], 0) + c.token_ids
    logits = np.asarray(offline(np.asarray([ids], np.int64))[0], np.float64)[0]
    n = len(offline.encode(PROMPTS[2], 0))
    for k, (tok, lp, top) in enumerate(zip(c.token_ids, c.logprobs.token_logprobs, c.logprobs.top_logprobs)):
        row = logits[n - 1 + k]
        ref = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert lp == pytest.approx(ref[tok], abs=1e-3)
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp)  # greedy: the chosen one is the likeliest
        assert sorted(top.values(), reverse=True) == pytest.approx(sorted(ref, reverse=True)[:3], abs=1e-3)
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_seed_reproduces_sampling_and_n_samples(server, client):
    def sample(seed, n=1):
        r = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=24, temperature=1.0,
                                      seed=seed, n=n, extra_body={"ignore_eos": True, "return_token_ids": True})
        return [c.token_ids for c in sorted(r.choices, key=lambda c: c.index)]

    a, b, c = sample(5), sample(5), sample(6)
    assert a == b and a != c
    three = sample(5, n=3)
    assert three[0] == a[0]  # sequence i samples with seed + i
    assert len({tuple(t) for t in three}) == 3
    greedy = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=8, temperature=0, n=2)
    assert [ch.index for ch in greedy.choices] == [0, 1] and greedy.choices[0].text == greedy.choices[1].text


def test_error_codes(server, client, trained_artifact):
    def error(fn, exc):
        with pytest.raises(exc) as e:
            fn()
        body = e.value.body
        assert set(body) >= {"message", "type", "code"} and body["message"], body  # OpenAI's error object
        return body

    m = server.model
    bad_key = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    assert error(lambda: bad_key.models.list(), openai.AuthenticationError)["code"] == "invalid_api_key"
    assert httpx.post(f"{server.base_url}/completions", json={"model": m, "prompt": "x"}).status_code == 401
    assert error(lambda: client.completions.create(model="gpt-5", prompt="x"), openai.NotFoundError)["code"] \
        == "model_not_found"
    for kw in ({"max_tokens": 10_000}, {"temperature": -1.0}, {"max_tokens": 0}, {"prompt": [10**6]},
               {"prompt": 5}, {"n": 0}, {"logprobs": 99}):
        error(lambda: client.completions.create(**{"model": m, "prompt": "x", "max_tokens": 4, **kw}),
              openai.BadRequestError)
    error(lambda: client.chat.completions.create(model=m, messages=[], max_tokens=4), openai.BadRequestError)
    error(lambda: client.chat.completions.create(model=m, messages=[{"role": "wizard", "content": "x"}]),
          openai.BadRequestError)
    assert metric(server.metrics(), "llmc_kv_pages_used") == 0


def test_full_queue_is_429(trained_artifact):
    # one sequence per step and one queued request: while a long request runs, of two more
    # the first waits and the second is refused
    with serving(trained_artifact, EngineConfig(max_num_seqs=1, max_queue=1)) as running:
        c = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0, timeout=120)
        long = c.completions.create(model=running.model, prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True})
        next(iter(long))

        async def two():
            ac = openai.AsyncOpenAI(base_url=running.base_url, api_key="x", max_retries=0, timeout=120)
            try:
                return await asyncio.gather(*(ac.completions.create(model=running.model, prompt="x", max_tokens=2)
                                              for _ in range(2)), return_exceptions=True)
            finally:
                await ac.close()

        results = asyncio.run(two())
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(refused) == 1 and refused[0].body["code"] == "queue_full"
        assert sum(1 for r in results if not isinstance(r, Exception)) == 1
        long.close()
        assert metric(running.metrics(), "llmc_rejected_queue_full_total") == 1


def _wait_for(running, cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = running.metrics()
        if cond(m):
            return m
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {m}")


def test_a_client_that_leaves_frees_its_pages(trained_artifact):
    with serving(trained_artifact, EngineConfig()) as running:
        c = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0, timeout=120)
        stream = c.completions.create(model=running.model, prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        for _ in range(3):
            next(it)
        assert metric(running.metrics(), "llmc_kv_pages_used") > 0
        stream.close()  # the streaming client goes away
        _wait_for(running, lambda m: metric(m, 'llmc_requests_finished_total{reason="abort"}') == 1
                  and metric(m, "llmc_kv_pages_used") == 0)
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            httpx.post(f"{running.base_url}/completions", timeout=0.1,  # 250 tokens take ~0.25 s on 2 cores
                       json={"model": running.model, "prompt": PROMPTS[0], "max_tokens": 250, "ignore_eos": True})
        m = _wait_for(running, lambda m: metric(m, 'llmc_requests_finished_total{reason="abort"}') == 2
                      and metric(m, "llmc_kv_pages_used") == 0)
        assert metric(m, "llmc_generation_tokens_total") < 400  # neither ran to its end
