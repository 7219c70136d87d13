"""Keeps K replica processes serving: starts them, watches them, restarts or gives up.

The watch runs on the front's event loop: every `poll_interval` it looks for exited
children, every `health_interval` it asks each one's /health. A replica whose process
exited is logged (which one, exit code or signal), taken out of the router, and its
requests in flight are written off (their connections broke with the process; the front
answers each with a 502 naming the cause). A replica that stops answering /health
`health_failures` times in a row is killed, which makes it an exited one. Then, with
restarts on, it is started again on a new port, unless it already died `max_restarts`
times within `restart_window` seconds: then, as with restarts off, the supervisor gives
up and the front exits non-zero.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import httpx

from .replica_process import ReplicaFailed, ReplicaProcess, describe_exit
from .router import Router

log = logging.getLogger("llmc.serve.dp")


@dataclass(frozen=True)
class DpConfig:
    restart: bool = True
    max_restarts: int = 3  # deaths of one replica within restart_window that are still restarted
    restart_window: float = 300.0
    poll_interval: float = 0.1
    health_interval: float = 2.0
    health_timeout: float = 10.0
    health_failures: int = 3
    startup_timeout: float = 900.0  # a GPU replica loads weights and captures graphs first
    stop_timeout: float = 60.0


class Supervisor:
    def __init__(self, replicas: list[ReplicaProcess], config: DpConfig, client: httpx.AsyncClient,
                 progress: Callable[[str], None]):
        self.replicas, self.config, self.client, self.progress = replicas, config, client, progress
        self.router = Router(len(replicas))
        self.deaths = [deque() for _ in replicas]  # monotonic times of each replica's deaths
        self.restarts = [0] * len(replicas)
        self.failures = [0] * len(replicas)  # deaths seen, restarted or not
        self.last_exit: list[str | None] = [None] * len(replicas)
        self._bad_health = [0] * len(replicas)
        self._restarting: set[int] = set()
        self.stopping = False
        self.gave_up: str | None = None  # why the front must exit non-zero
        self.on_give_up: Callable[[], None] = lambda: None

    # --- start / stop
    async def start_all(self) -> None:
        for r in self.replicas:
            r.start()
            self.progress(f"{r} starting on port {r.port}")
        try:
            waits = [r.wait_ready(self.client, self.config.startup_timeout) for r in self.replicas]
            for r, took in zip(self.replicas, await asyncio.gather(*waits)):
                self.router.set_up(r.index, True)
                self.progress(f"{r} ready in {took:.1f} s")
        except (ReplicaFailed, asyncio.CancelledError, KeyboardInterrupt):
            await self.stop_all()
            raise

    async def stop_all(self) -> None:
        self.stopping = True
        for r in self.replicas:
            self.router.set_up(r.index, False)
        await asyncio.gather(*(r.stop(self.config.stop_timeout) for r in self.replicas))

    # --- the watch
    async def watch(self) -> None:
        next_health = time.monotonic() + self.config.health_interval
        while not self.stopping:
            for r in self.replicas:
                if r.index in self._restarting:
                    continue
                rc = r.poll()
                if rc is not None and not self.stopping:
                    self._died(r, rc)
            if time.monotonic() >= next_health:
                await self._check_health()
                next_health = time.monotonic() + self.config.health_interval
            await asyncio.sleep(self.config.poll_interval)

    async def _check_health(self) -> None:
        async def one(r: ReplicaProcess) -> None:
            try:
                ok = (await self.client.get(f"{r.url}/health", timeout=self.config.health_timeout)).status_code == 200
            except httpx.TransportError:
                ok = False
            if ok or r.poll() is not None:
                self._bad_health[r.index] = 0
                return
            self._bad_health[r.index] += 1
            if self._bad_health[r.index] >= self.config.health_failures:
                log.error("%s failed %d health checks in a row: killing it", r, self._bad_health[r.index])
                self._bad_health[r.index] = 0
                r.kill()  # the next poll sees it exit and handles it as a death

        up = [r for r in self.replicas if self.router.loads[r.index].up]
        await asyncio.gather(*(one(r) for r in up))

    def _died(self, r: ReplicaProcess, rc: int) -> None:
        how = describe_exit(rc)
        self.last_exit[r.index] = how
        self.failures[r.index] += 1
        self.router.set_up(r.index, False)
        self.router.drop_all(r.index)  # their connections broke with the process: the front answers them
        log.error("%s %s", r, how)
        now = time.monotonic()
        deaths = self.deaths[r.index]
        deaths.append(now)
        while deaths and deaths[0] < now - self.config.restart_window:
            deaths.popleft()
        if not self.config.restart:
            self._give_up(f"{r} {how} and replica restarts are off")
        elif len(deaths) > self.config.max_restarts:
            self._give_up(f"{r} {how}: {len(deaths)} deaths within {self.config.restart_window:.0f} s, "
                          f"more than --max-restarts {self.config.max_restarts}")
        else:
            self._restarting.add(r.index)
            asyncio.ensure_future(self._restart(r))

    async def _restart(self, r: ReplicaProcess) -> None:
        try:
            r.start()
            self.restarts[r.index] += 1
            log.warning("restarting replica %d (restart %d): pid %s on port %d", r.index, self.restarts[r.index],
                        r.pid, r.port)
            took = await r.wait_ready(self.client, self.config.startup_timeout)
            if not self.stopping:
                self.router.set_up(r.index, True)
                log.warning("%s is back, ready in %.1f s", r, took)
        except ReplicaFailed as e:
            log.error("%s", e)
        finally:
            self._restarting.discard(r.index)  # a failed start is a death the next poll handles

    def _give_up(self, why: str) -> None:
        if self.gave_up is None:
            self.gave_up = why
            log.error("giving up: %s; stopping the server", why)
            self.on_give_up()

    # --- for the front's error messages
    async def failure_of(self, index: int, incarnation: int, wait: float = 2.0) -> str | None:
        """How replica `index` (as it was at `incarnation`) ended, waiting up to `wait` s for
        its exit to show; None if it is still running."""
        r = self.replicas[index]
        deadline = time.monotonic() + wait
        while True:
            if r.incarnation != incarnation:
                return self.last_exit[index] or "went away"
            rc = r.poll()
            if rc is not None:
                return describe_exit(rc)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)


__all__ = ["Supervisor", "DpConfig"]
