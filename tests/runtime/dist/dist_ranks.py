"""Helpers for the dist tests: run n ranks as threads of this process (store, rendezvous and
HostComm only need separate clients, not separate processes), or launch dist_workers.py."""
from __future__ import annotations

import io
import pathlib
import sys
import threading

from llmc.runtime.dist import DistEnv, close_store
from llmc.runtime.dist.launch import free_port, launch

WORKERS = pathlib.Path(__file__).with_name("dist_workers.py")


def run_threads(n: int, fn, timeout: float = 30.0) -> list:
    """fn(env) on n threads, one per rank of a fresh job; each rank's return value or exception."""
    port = free_port()
    out: list = [None] * n

    def body(r):
        try:
            out[r] = fn(DistEnv(r, n, r, "127.0.0.1", port))
        except BaseException as e:  # noqa: BLE001 - handed back to the test to assert on
            out[r] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    for r in reversed(range(n)):  # the ranks' store clients, rank 0's (the host) last
        close_store(DistEnv(r, n, r, "127.0.0.1", port))
    return out


def launch_workers(scenario: str, n: int, *args, **kw):
    """Launch dist_workers.py SCENARIO ARGS as n ranks; (result, captured stdout, captured stderr)."""
    out, err = io.StringIO(), io.StringIO()
    result = launch([sys.executable, str(WORKERS), scenario, *map(str, args)], n, stdout=out, stderr=err,
                    check=False, **kw)
    return result, out.getvalue(), err.getvalue()
