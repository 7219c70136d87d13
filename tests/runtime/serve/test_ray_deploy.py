"""`llmc serve ART --ray --dp 2`: a real local Ray cluster, Ray Serve running two replicas
(each an `llmc serve` process), the real openai client on loopback: greedy completions
equal offline generation, streamed and not; concurrent requests reach both replicas; a
replica whose `llmc serve` process is killed fails Ray's health check and is replaced;
SIGTERM undeploys and exits 0."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

PROMPTS = ["import os\n", "def __init__(self, name, value=None):\n    ", "for i in range(", "try:\n    import"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_pids(artifact) -> set[int]:
    """The `llmc serve ARTIFACT --host 127.0.0.1 ...` processes the Ray replicas run."""
    pattern = f"llmc serve {os.path.realpath(artifact)} --host 127.0.0.1"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture(scope="module")
def ray_server(trained_artifact, tmp_path_factory):
    port = _free_port()
    log_file = tmp_path_factory.mktemp("ray") / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmc", "serve", str(trained_artifact), "--ray", "--dp", "2",
                                 "--port", str(port), "--log-level", "warning"], stdout=log, stderr=log,
                                cwd=log_file.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log_file.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Ray Serve did not come up:\n" + log_file.read_text()[-3000:]
            time.sleep(0.5)
        yield proc, url, log_file
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_greedy_completions_through_ray_equal_offline(ray_server, offline):
    _, url, _ = ray_server
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    for p in PROMPTS[:2]:
        ref = offline.generate([p], max_new_tokens=16)[0]
        r = c.completions.create(model="tiny.llmc", prompt=p, max_tokens=16, temperature=0)
        assert r.choices[0].text == ref.text
        chunks = list(c.completions.create(model="tiny.llmc", prompt=p, max_tokens=16, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_concurrent_requests_reach_both_replicas(ray_server, trained_artifact):
    _, url, _ = ray_server
    assert len(_replica_pids(trained_artifact)) == 2

    def one(p):
        return httpx.post(f"{url}/v1/completions", json={"model": "tiny.llmc", "prompt": p, "max_tokens": 48,
                                                         "temperature": 0, "ignore_eos": True}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, PROMPTS * 2))
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48 for r in got)
    assert len({r.headers["x-llmc-replica"] for r in got}) == 2


def test_a_dead_llmc_process_fails_the_health_check_and_is_replaced(ray_server, trained_artifact):
    proc, url, log_file = ray_server
    before = _replica_pids(trained_artifact)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # Ray's health check (every 10 s) finds it; a fresh replica starts its own llmc serve
        now = _replica_pids(trained_artifact)
        if victim not in now and len(now) == 2:
            break
        assert proc.poll() is None, log_file.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the replica was not replaced: {now}\n" + log_file.read_text()[-3000:]
        time.sleep(0.5)
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny.llmc", "prompt": PROMPTS[0], "max_tokens": 8,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_sigterm_undeploys(ray_server, trained_artifact):
    proc, _, log_file = ray_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log_file.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while _replica_pids(trained_artifact):
        assert time.monotonic() < deadline, "llmc serve replicas outlived the deployment"
        time.sleep(0.5)
