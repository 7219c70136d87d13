"""Serving a tensor-parallel model: rank 0 leads, the other ranks follow step by step.

Rank 0 runs the engine (scheduler, sampler, HTTP) as for a whole model; its step runner is a
`LeaderStep`, which before each step broadcasts the step's inputs (token ids, positions and page
metadata: a few KB) over a host channel, then runs its own shard. The followers (`follow`) run
the same step on their shards with their own KV pages: the collectives inside the step (NCCL on
the GPU) need every rank to call it, with the same page ids, in the same order (vLLM's driver /
worker split). The pool is made alike everywhere: the leader sends its byte budget first.

KV swap is not offered (each rank holds its own heads' pages; a swap would have to copy on every
rank): a tensor-parallel server preempts by recompute.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import LLMCError

STEP_NAMES = ("tokens", "positions", "logit_rows", "page_table", "kv_lens", "q_starts")
DTYPES = (np.dtype(np.int64), np.dtype(np.int32))
POOL, LOGITS, GREEDY, STOP = 1, 2, 3, 4
HEADER = 2 + 4 * len(STEP_NAMES)


class StepChannel:
    """Rank 0 -> every rank: a command and the step's int arrays, over a host communicator's
    broadcast (a fixed-size header, then each array)."""

    def __init__(self, comm):
        self.comm = comm

    def send(self, cmd: int, arrays: dict[str, np.ndarray] | None = None, value: int = 0) -> None:
        arrays = arrays or {}
        head = np.zeros(HEADER, np.int64)
        head[0], head[1] = cmd, value
        for i, name in enumerate(STEP_NAMES):
            a = arrays.get(name)
            if a is None:
                head[2 + 4 * i] = -1
                continue
            if a.dtype not in DTYPES or a.ndim > 2:
                raise LLMCError(f"step input {name}: {a.dtype}{a.shape} cannot go to the other ranks")
            shape = list(a.shape) + [1] * (2 - a.ndim)
            head[2 + 4 * i:6 + 4 * i] = [DTYPES.index(a.dtype), a.ndim, *shape]
        self.comm.broadcast(head, root=0)
        for name in STEP_NAMES:
            if name in arrays:
                self.comm.broadcast(np.ascontiguousarray(arrays[name]), root=0)

    def recv(self) -> tuple[int, int, dict[str, np.ndarray]]:
        head = np.zeros(HEADER, np.int64)
        self.comm.broadcast(head, root=0)
        arrays = {}
        for i, name in enumerate(STEP_NAMES):
            code, ndim, d0, d1 = (int(v) for v in head[2 + 4 * i:6 + 4 * i])
            if code < 0:
                continue
            a = np.empty((d0, d1)[:ndim], DTYPES[code])
            self.comm.broadcast(a, root=0)
            arrays[name] = a
        return int(head[0]), int(head[1]), arrays


class LeaderStep:
    """Rank 0's step runner: every call goes to the followers first (see the module doc)."""

    def __init__(self, inner, channel: StepChannel):
        self.inner, self.channel = inner, channel
        self.device = inner.device

    def __getattr__(self, name: str) -> Any:  # padded(), bucket(), executor, ... of the wrapped runner
        return getattr(self.inner, name)

    def default_kv_memory(self) -> int:
        return self.inner.default_kv_memory()

    def make_pool(self, layout, kv_memory: int):
        self.channel.send(POOL, value=int(kv_memory))
        return self.inner.make_pool(layout, kv_memory)

    def bind_pool(self, pool) -> None:
        self.inner.bind_pool(pool)

    def __call__(self, inputs: dict) -> np.ndarray:
        self.channel.send(LOGITS, inputs)
        return self.inner(inputs)

    def greedy(self, inputs: dict) -> np.ndarray:
        self.channel.send(GREEDY, inputs)
        return self.inner.greedy(inputs)

    def done(self) -> None:
        self.inner.done()

    def stop(self) -> None:
        self.channel.send(STOP)


def lead(llm, channel: StepChannel):
    """Make `llm` (rank 0's LLM) drive the followers; returns the LeaderStep (call .stop() at the end)."""
    step = LeaderStep(llm.step, channel)
    llm.step = step
    return step


def follow(llm, channel: StepChannel) -> int:
    """Run the leader's steps on this rank's shard until it says stop; returns the steps run."""
    steps = 0
    while True:
        cmd, value, arrays = channel.recv()
        if cmd == STOP:
            return steps
        if cmd == POOL:
            llm.kv_memory = value
            llm.pool  # noqa: B018 - makes and binds the pool, as the leader's
            continue
        inputs = dict(arrays)
        for i, c in enumerate(llm.pool.caches):
            inputs[f"kv_cache.{i}"] = c
        if cmd == LOGITS:
            llm.step(inputs)
        elif cmd == GREEDY:
            llm.step.greedy(inputs)
        else:
            raise LLMCError(f"follower: unknown command {cmd} from the leader")
        steps += 1


__all__ = ["StepChannel", "LeaderStep", "lead", "follow"]
