"""`llmc serve` of a tensor-parallel or pipeline-parallel artifact on the CPU: 2 rank processes under
the launcher, rank 0 (the first shard or stage) serving the OpenAI API and leading, rank 1 following
its steps over the host channel (a second stage receives the first's activations and broadcasts the logits);
concurrent requests through a real HTTP client get the whole model's greedy tokens; a follower
that dies takes the server down with a report instead of hanging it."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import llmc

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from causal_lms import VOCAB, tiny_causal_lm  # noqa: E402

BOUNDS = {"batch": (1, 4), "seq": (1, 64)}
PROMPTS = [[5, 6, 7, 8, 9], [3, 17, 40, 41, 2, 88, 60, 61, 33, 12, 9], [44] * 7, [9, 8, 7]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CUTS = {"tp": {"tp": 2}, "pp": {"pp": 2}, "tp_pp": {"tp": 2, "pp": 2}}


@pytest.fixture(scope="module", params=list(CUTS))
def arts(request, tmp_path_factory):
    """The model cut for 2 ranks (2 tensor shards, or 2 pipeline stages of a layer each) or for 4
    (2 stages of 2 shards)."""
    model = tiny_causal_lm("qwen2", num_key_value_heads=4)
    ids = torch.randint(3, VOCAB, (1, 8))
    whole = llmc.compile(model, (ids,), dim_bounds=BOUNDS, generate=True)
    want = [o.token_ids for o in whole.generate(PROMPTS, max_new_tokens=10, stop_token_ids=())]
    art = llmc.compile(model, (ids,), dim_bounds=BOUNDS, generate=True, **CUTS[request.param])
    return art.export(tmp_path_factory.mktemp(request.param) / "m"), want, 2 * len(CUTS[request.param])


def _start(art, port):
    p = subprocess.Popen([sys.executable, "-m", "llmc", "serve", str(art), "--port", str(port), "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert p.poll() is None, p.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(0.3)
    p.kill()
    raise AssertionError("the parallel server did not come up")


def _ranks(p) -> list[int]:
    """The rank processes of the server launched as `p`: its descendants running tp_run serve (a
    machine-wide pgrep also counted another server's ranks still exiting: 5 of 4 once)."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [p.pid]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            try:
                cmd = pathlib.Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"llmc.runtime.tp_run serve" in cmd:
                found.append(c)
    return sorted(found)


def test_parallel_server_matches_the_whole_model(arts):
    from concurrent.futures import ThreadPoolExecutor

    art, want, _ = arts
    port = _port()
    p = _start(art, port)
    try:
        def ask(prompt):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": "m", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                                 "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, PROMPTS))
        ids = [g["choices"][0].get("token_ids") for g in got]
        assert ids == want
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)


def test_a_follower_that_dies_stops_the_server(arts):
    art, _, n = arts
    port = _port()
    p = _start(art, port)
    try:
        ranks = _ranks(p)
        assert len(ranks) == n
        follower = max(ranks)  # started last: the last rank
        os.kill(follower, signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        assert p.returncode != 0
        assert "SIGKILL" in out or "signal" in out, out[-2000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
