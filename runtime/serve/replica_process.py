"""One serving replica: a `llmc serve ARTIFACT` child process (the ordinary single-engine
server, unchanged) listening on a loopback port of its own.

The child gets its own session, so a Ctrl-C at the terminal reaches only the front, which
then stops its replicas in order (drain, then exit); and on Linux it is asked to receive
SIGTERM if the front dies without that chance (PR_SET_PDEATHSIG), so a killed front leaves
no orphans serving on forgotten ports.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from ...errors import LLMCError


class ReplicaFailed(LLMCError):
    """A replica exited, or did not come up in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ReplicaProcess:
    """`python -m llmc serve ARTIFACT --host 127.0.0.1 --port P FLAGS...` with `env` added to
    this process's environment. `start` may be called again after the child exited (a
    restart: a new port, a new pid, the next incarnation)."""

    def __init__(self, index: int, artifact: str, flags: list[str], env: dict[str, str] | None = None,
                 where: str = "cpu", host: str = "127.0.0.1"):
        self.index, self.artifact, self.flags = index, artifact, list(flags)
        self.env, self.where, self.host = dict(env or {}), where, host
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.incarnation = 0
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def __str__(self) -> str:
        return f"replica {self.index} (pid {self.pid}, {self.where})"

    def start(self) -> None:
        self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "llmc", "serve", self.artifact, "--host", self.host, "--port", str(self.port),
               *self.flags]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.incarnation += 1
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> float:
        """Seconds until /health answered 200; ReplicaFailed if the child exits first or
        the time runs out."""
        deadline = self.started_at + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                raise ReplicaFailed(f"{self} {describe_exit(rc)} while starting (its error is above)")
            try:
                r = await client.get(f"{self.url}/health", timeout=5.0)
                if r.status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ReplicaFailed(f"{self} did not answer /health within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    def terminate(self) -> None:
        if self.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            self.proc.kill()

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM (the replica stops intake and drains), SIGKILL after `timeout` seconds."""
        if self.proc is None:
            return None
        self.terminate()
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.poll() is None:
            self.kill()
            while self.poll() is None:
                await asyncio.sleep(0.05)
        return self.proc.returncode


def placement(replicas: int, device: str, devices: list[int] | None = None, parent_env: dict[str, str] | None = None,
              gpus_per_replica: int = 1) -> list[tuple[dict[str, str], str]]:
    """Per replica: the environment it adds, and a word on where it runs.

    cuda: `gpus_per_replica` GPUs each (1, or a tensor-parallel artifact's group size: the
    replica's ranks then take its GPUs in order), by CUDA_VISIBLE_DEVICES: `devices` (default
    0..K*G-1, indices into the GPUs this process may see: an inherited CUDA_VISIBLE_DEVICES
    is respected) cut into consecutive groups, so each replica's artifact runs from its
    cuda:0. cpu: the replicas share the machine, the cores split evenly between them
    (LLMC_NUM_THREADS / OPENBLAS_NUM_THREADS, unless set)."""
    env = os.environ if parent_env is None else parent_env
    if replicas < 1:
        raise LLMCError(f"--dp must be >= 1, got {replicas}")
    g = gpus_per_replica
    if device.startswith("cuda"):
        devices = list(range(replicas * g)) if devices is None else list(devices)
        if len(devices) != replicas * g:
            raise LLMCError(f"--devices names {len(devices)} GPUs for --dp {replicas} replicas of {g} GPU(s) each")
        if len(set(devices)) != len(devices) or min(devices) < 0:
            raise LLMCError(f"--devices {','.join(map(str, devices))}: each replica needs GPUs of its own")
        visible = env.get("CUDA_VISIBLE_DEVICES")
        names = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
        if names is not None and max(devices) >= len(names):
            raise LLMCError(f"--devices asks for GPU {max(devices)}, but CUDA_VISIBLE_DEVICES={visible} shows "
                            f"{len(names)}")
        groups = [devices[i * g:(i + 1) * g] for i in range(replicas)]
        return [({"CUDA_VISIBLE_DEVICES": ",".join(names[d] if names else str(d) for d in grp)},
                 f"GPU{'s' if g > 1 else ''} {','.join(map(str, grp))}") for grp in groups]
    if devices is not None:
        raise LLMCError(f"--devices is for GPU artifacts; this one runs on the {device}")
    cores = max(1, (os.cpu_count() or 1) // (replicas * g))
    extra = {k: str(cores) for k in ("LLMC_NUM_THREADS", "OPENBLAS_NUM_THREADS")
             if k not in env and not (k == "LLMC_NUM_THREADS" and "TVM_NUM_THREADS" in env)}
    return [(dict(extra), f"cpu, {extra.get('LLMC_NUM_THREADS', 'inherited')} threads") for _ in range(replicas)]


__all__ = ["ReplicaProcess", "ReplicaFailed", "describe_exit", "free_port", "placement"]
