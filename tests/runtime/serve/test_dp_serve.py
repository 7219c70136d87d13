"""`llmc serve ART --dp 2` as a real process tree (a front and two replica processes) on
loopback, against a single-engine server (DP=1) over the same artifact: the same greedy
completions, requests spread over both replicas by outstanding tokens, streaming through
the front, /metrics summed over the replicas; a replica killed mid-request fails that
request with an error naming it and is restarted, or (--no-restart-replicas) the server
exits non-zero; 429 only when every replica's queue is full; SIGTERM leaves no replica."""
from __future__ import annotations

import concurrent.futures
import json
import os
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

PROMPTS = ["import os\n", "def __init__(self, name, value=None):\n    ", "class Stack:\n    \"\"\"A stack.\"\"\"\n\n",
           "for i in range(", "    return self._", "try:\n    import"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Front:
    """`python -m llmc serve ART --dp 2 ...` in a child process; its stderr in a file."""

    def __init__(self, artifact, folder, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = folder / f"front-{self.port}.log"
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "llmc", "serve", str(artifact), "--dp", "2",
                                          "--port", str(self.port), "--log-level", "warning", *flags],
                                         cwd=folder, stderr=log, stdout=log)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, "the front did not come up:\n" + self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_file.read_text()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def replicas(self) -> list[dict]:
        return self.health()["replicas"]

    def metrics(self, url: str | None = None) -> dict[str, float]:
        text = httpx.get(f"{url or self.url}/metrics", timeout=10).text
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}

    def complete(self, prompt: str, max_tokens: int, **extra) -> httpx.Response:
        body = {"model": "tiny.llmc", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, **extra}
        return httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)

    def wait_restarted(self, index: int, restarts: int, old_pid: int) -> dict:
        deadline = time.monotonic() + 60
        while True:
            row = self.replicas()[index]
            if row["up"] and row["restarts"] >= restarts:
                assert row["pid"] != old_pid
                return row
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"replica {index} was not restarted:\n{self.log()}"
            time.sleep(0.1)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def front(trained_artifact, tmp_path_factory):
    f = Front(trained_artifact, tmp_path_factory.mktemp("dp"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def dp1(trained_artifact):
    with serving(trained_artifact, EngineConfig()) as running:
        yield running


def _dp1_complete(dp1, prompt: str, max_tokens: int) -> dict:
    body = {"model": dp1.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    return httpx.post(f"{dp1.base_url}/completions", json=body, timeout=120).json()


def test_greedy_completions_equal_dp1_and_spread_over_both_replicas(front, dp1):
    before = {r["replica"]: front.metrics(f"http://127.0.0.1:{r['port']}") for r in front.replicas()}
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: front.complete(p, 24), PROMPTS))
    served_by = set()
    for p, r in zip(PROMPTS, got):
        assert r.status_code == 200, r.text
        ref = _dp1_complete(dp1, p, 24)["choices"][0]
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == ref["token_ids"] and choice["text"] == ref["text"]
        assert choice["finish_reason"] == ref["finish_reason"]
        served_by.add(r.headers["x-llmc-replica"])
    assert served_by == {"0", "1"}
    # each replica's own counters moved; the front's /metrics is their sum
    rows = front.replicas()
    after = {r["replica"]: front.metrics(f"http://127.0.0.1:{r['port']}") for r in rows}
    own = [metric(after[i], "llmc_generation_tokens_total") - metric(before[i], "llmc_generation_tokens_total")
           for i in (0, 1)]
    assert all(n > 0 for n in own), own
    total = front.metrics()
    assert metric(total, "llmc_generation_tokens_total") == sum(metric(after[i], "llmc_generation_tokens_total")
                                                                 for i in (0, 1))
    assert metric(total, 'llmc_replica_up{replica="0"}') == 1 and metric(total, 'llmc_replica_up{replica="1"}') == 1


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_through_the_front(front, dp1, kind):
    c = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0, timeout=60)
    ref_c = openai.OpenAI(base_url=dp1.base_url, api_key="x", max_retries=0, timeout=60)
    if kind == "completion":
        args = dict(model="tiny.llmc", prompt=PROMPTS[1], max_tokens=20, temperature=0)
        ref = ref_c.completions.create(**{**args, "model": dp1.model}).choices[0].text
        chunks = list(c.completions.create(**args, stream=True))
        text = "".join(ch.choices[0].text for ch in chunks)
    else:
        args = dict(model="tiny.llmc", messages=[{"role": "user", "content": "def main("}], max_tokens=20,
                    temperature=0)
        ref = ref_c.chat.completions.create(**{**args, "model": dp1.model}).choices[0].message.content
        chunks = list(c.chat.completions.create(**args, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason is not None
    assert text == ref


def test_the_next_request_goes_to_the_less_loaded_replica(front):
    body = {"model": "tiny.llmc", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{front.url}/v1/completions", json=body, timeout=60) as long:
        busy = int(long.headers["x-llmc-replica"])
        lines = long.iter_lines()
        assert next(lines).startswith("data: ")
        # the long one still has ~240 tokens to go (this replica makes a few hundred a second)
        r = front.complete(PROMPTS[1], 2)
        assert r.status_code == 200 and r.headers["x-llmc-replica"] == str(1 - busy)
        rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    loads = front.metrics()
    assert loads[f'llmc_replica_outstanding_tokens{{replica="{busy}"}}'] == 0  # the books closed with the stream
    assert loads[f'llmc_replica_requests_in_flight{{replica="{busy}"}}'] == 0


def test_a_client_that_leaves_aborts_its_request_on_the_replica(front):
    body = {"model": "tiny.llmc", "prompt": PROMPTS[4], "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{front.url}/v1/completions", json=body, timeout=30) as r:
        replica = front.replicas()[int(r.headers["x-llmc-replica"])]
        url = f"http://127.0.0.1:{replica['port']}"
        before = front.metrics(url)
        aborted = metric(before, 'llmc_requests_finished_total{reason="abort"}')
        assert next(r.iter_lines()).startswith("data: ")
    # the stream is closed after one event: the replica stops generating and frees its pages
    deadline = time.monotonic() + 20
    while metric(front.metrics(url), 'llmc_requests_finished_total{reason="abort"}') != aborted + 1:
        assert time.monotonic() < deadline, "the replica did not abort the request"
        time.sleep(0.05)
    m = front.metrics(url)
    assert metric(m, "llmc_num_requests_running") == 0 and metric(m, "llmc_kv_pages_used") == 0
    made = metric(m, "llmc_generation_tokens_total") - metric(before, "llmc_generation_tokens_total")
    assert 1 <= made < 240
    rows = {x["replica"]: x for x in front.replicas()}
    assert rows[replica["replica"]]["in_flight"] == 0 and rows[replica["replica"]]["outstanding_tokens"] == 0


def test_a_killed_replica_fails_its_requests_and_comes_back(front):
    # a stream in flight: an error event naming the replica and the signal, then the end
    body = {"model": "tiny.llmc", "prompt": PROMPTS[2], "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{front.url}/v1/completions", json=body, timeout=30) as r:
        victim = int(r.headers["x-llmc-replica"])
        old_pid = front.replicas()[victim]["pid"]
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(old_pid, signal.SIGKILL)
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["message"] == f"replica {victim} was killed by SIGKILL while serving this request"
    assert len(events) < 240
    row = front.wait_restarted(victim, 1, old_pid)
    assert row["last_exit"] == "was killed by SIGKILL"
    assert f"replica {victim} (pid {old_pid}" in front.log() and "was killed by SIGKILL" in front.log()

    # a plain request in flight: 502 in OpenAI's error shape
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(front.complete, PROMPTS[3], 240, ignore_eos=True)
        deadline = time.monotonic() + 30
        while not any(x["in_flight"] for x in front.replicas()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        row = next(x for x in front.replicas() if x["in_flight"])
        os.kill(row["pid"], signal.SIGKILL)
        r = pending.result(timeout=30)
    assert r.status_code == 502
    assert r.json()["error"]["message"] == f"replica {row['replica']} was killed by SIGKILL while serving this request"
    front.wait_restarted(row["replica"], row["restarts"] + 1, row["pid"])
    assert metric(front.metrics(), "llmc_front_failed_total") == 2
    ok = front.complete(PROMPTS[0], 8)  # and the server serves on
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 8


def test_sigterm_stops_the_front_and_every_replica(front):
    pids = [r["pid"] for r in front.replicas()]
    assert all(_alive(p) for p in pids)
    assert front.close() == 0
    assert not any(_alive(p) for p in pids)


def test_429_only_when_every_queue_is_full_and_no_restart_exits(trained_artifact, tmp_path):
    f = Front(trained_artifact, tmp_path, "--max-num-seqs", "1", "--max-queue", "1", "--no-restart-replicas")
    try:
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            got = list(pool.map(lambda p: f.complete(p, 60, ignore_eos=True), PROMPTS + PROMPTS[:4]))
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
        for r in got:  # no accepted request is dropped
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 60
            else:
                assert r.json()["error"]["code"] == "queue_full"
        assert metric(f.metrics(), "llmc_front_rejected_total") == codes.count(429)
        served = {r.headers["x-llmc-replica"] for r in got if r.status_code == 200}
        assert served == {"0", "1"}  # a full replica's refusal sent requests on to the other

        rows = f.replicas()
        os.kill(rows[0]["pid"], signal.SIGKILL)
        code = f.proc.wait(30)
        assert code != 0
        assert not _alive(rows[1]["pid"])  # the survivor was stopped too
        log = f.log()
        assert f"replica 0 (pid {rows[0]['pid']}" in log and "was killed by SIGKILL and replica restarts are off" in log
    finally:
        f.close()


def test_a_replica_that_cannot_start_ends_the_command(trained_artifact, tmp_path):
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "llmc", "serve", str(trained_artifact), "--dp", "2", "--port", str(port),
                        "--max-num-seqs", "9999"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "the step function takes at most" in r.stderr  # the replica's own error
    assert "exited with code 2 while starting" in r.stderr.splitlines()[-1]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_a_hung_replica_is_killed_by_the_health_checks_and_restarted(trained_artifact, caplog):
    """A replica that stops answering (SIGSTOP: alive, silent) fails its health checks, is
    killed, and comes back: what keeps a hung replica from hanging its clients forever."""
    import asyncio
    import logging

    from llmc.runtime.serve.dp_supervisor import DpConfig, Supervisor
    from llmc.runtime.serve.replica_process import ReplicaProcess

    config = DpConfig(health_interval=0.3, health_timeout=0.5, health_failures=2)
    replicas = [ReplicaProcess(i, str(trained_artifact), ["--log-level", "warning"]) for i in range(2)]

    async def scenario():
        async with httpx.AsyncClient() as client:
            sup = Supervisor(replicas, config, client, progress=lambda msg: None)
            await sup.start_all()
            watch = asyncio.ensure_future(sup.watch())
            try:
                hung = replicas[1].pid
                os.kill(hung, signal.SIGSTOP)
                deadline = time.monotonic() + 40
                while not (sup.restarts[1] == 1 and sup.router.loads[1].up):
                    assert time.monotonic() < deadline and sup.gave_up is None
                    if replicas[1].pid == hung:
                        assert sup.router.loads[0].up
                    await asyncio.sleep(0.1)
                assert replicas[1].pid != hung and not _alive(hung)
                assert sup.last_exit[1] == "was killed by SIGKILL" and sup.restarts[0] == 0
                r = await client.get(f"{replicas[1].url}/health")
                assert r.status_code == 200
            finally:
                watch.cancel()
                await sup.stop_all()

    with caplog.at_level(logging.ERROR, logger="llmc.serve.dp"):
        try:
            asyncio.run(scenario())
        finally:
            for r in replicas:
                r.kill()
    assert any("failed 2 health checks in a row: killing it" in m for m in caplog.messages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_front_killed_outright_leaves_no_replica(trained_artifact, tmp_path):
    f = Front(trained_artifact, tmp_path)
    pids = [r["pid"] for r in f.replicas()]
    f.proc.kill()  # SIGKILL: no chance to stop them; the replicas get SIGTERM from the kernel (Linux)
    f.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "replicas outlived their front"
        time.sleep(0.1)
