"""`llmc serve` as a process: SIGTERM stops intake and drains what is in flight; and a
second chat turn over a long history reuses the first turn's pages (the prefix cache)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serving import metric, serving

from llmc.runtime.serve.engine import EngineConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_intake_and_drains(trained_artifact, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmc", "serve", str(trained_artifact), "--port", str(port),
                             "--log-level", "warning"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        stream = iter(c.completions.create(model="tiny.llmc", prompt="import os\n", max_tokens=240, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
        next(stream)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no longer listening
            httpx.get(f"http://127.0.0.1:{port}/health")
        assert proc.poll() is None  # still finishing the stream
        rest = list(stream)
        assert rest[-2].choices[0].finish_reason == "length"
        assert rest[-1].usage.completion_tokens == 240  # the request in flight ran to its end
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_chat_turn_reuses_the_history_pages(trained_artifact, offline):
    history = [{"role": "system", "content": "You complete Python code."},
               {"role": "user", "content": open(__import__("os").__file__).read()[:500]}]
    with serving(trained_artifact, EngineConfig()) as running:
        c = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0, timeout=60)
        first = c.chat.completions.create(model=running.model, messages=history, max_tokens=8, temperature=0)
        before = running.metrics()
        turn2 = history + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "def main():"}]
        second = c.chat.completions.create(model=running.model, messages=turn2, max_tokens=8, temperature=0)
        after = running.metrics()
    hist_tokens = first.usage.prompt_tokens
    assert hist_tokens > 100 and second.usage.prompt_tokens > hist_tokens
    hits = metric(after, "llmc_prefix_cache_hit_tokens_total") - metric(before, "llmc_prefix_cache_hit_tokens_total")
    assert hits >= (hist_tokens // 16 - 1) * 16  # the history's full pages, all but the last one maybe
    computed = metric(after, "llmc_prompt_tokens_total") - metric(before, "llmc_prompt_tokens_total")
    assert computed <= second.usage.prompt_tokens - hits + 1  # only the new tail went through the model
