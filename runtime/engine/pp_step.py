"""Running one pipeline stage in a generation loop that every stage runs alike.

Each stage's process runs the same TokenLoop (the same scheduling, the same sampling, seeded
alike); a step runs the stage's program, whose RECV waits for the previous stage's activations
and whose SEND hands them on, and then the last stage broadcasts the logits, so every stage picks
the same tokens and feeds the same next step. The pools agree on their page count (the first
stage's), since which sequences fit decides the schedule. That lockstep (one step in flight) is
what the serving engine's leader and followers run; `generate` with a token channel keeps
micro-batches in flight instead (runtime/engine/pp_loop.py: MicroBatchLoop).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import LLMCError
from .pp_loop import MicroBatchLoop


class PipelineStep:
    def __init__(self, inner, comm, stage: int, stages: int, vocab: int, root: int | None = None,
                 tokens=None, micro_batches: int = 1):
        """comm: the whole job's communicator; root: the rank whose logits every rank takes (the
        last stage's; default stages - 1, the last stage of a job of stages alone). tokens: a host
        communicator over the same ranks for the root's sampled tokens (MicroBatchLoop); with it,
        `generate` keeps `micro_batches` steps in flight."""
        self.inner, self.comm = inner, comm
        self.stage, self.stages, self.vocab = stage, stages, vocab
        self.root = stages - 1 if root is None else root
        self.device = inner.device
        self.tokens = tokens
        self.micro_batches = int(micro_batches) if tokens is not None else 1
        if self.micro_batches < 1:
            raise LLMCError(f"micro_batches must be >= 1, got {micro_batches}")

    @property
    def is_root(self) -> bool:
        return self.comm.rank == self.root

    def token_loop(self, pool, limits, prompts, params):
        """The generation loop for this stage: micro-batches in flight where a token channel was
        given and micro_batches > 1, else None (the caller's lockstep TokenLoop)."""
        if self.micro_batches == 1:
            return None
        return MicroBatchLoop(self, pool, limits, prompts, params, self.micro_batches)

    def publish(self, tokens) -> None:
        """The root's sampled tokens of one step, to every other rank (small: the socket takes them
        at once, so the root goes on to its next step)."""
        buf = np.asarray(tokens, np.int64)
        for peer in range(self.tokens.world_size):
            if peer != self.root:
                self.tokens.send(buf, peer)

    def receive(self, n: int) -> np.ndarray:
        """The root's `n` sampled tokens of the oldest step not yet received."""
        buf = np.empty(n, np.int64)
        self.tokens.recv(buf, self.root)
        return buf

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def default_kv_memory(self) -> int:
        return self.inner.default_kv_memory()

    def make_pool(self, layout, kv_memory: int):
        pages = np.array([max(1, int(kv_memory) // layout.page_bytes)], np.int64)
        self.comm.broadcast(pages, root=0)  # the first stage's count, everywhere
        return self.inner.make_pool(layout, int(pages[0]) * layout.page_bytes)

    def bind_pool(self, pool) -> None:
        self.inner.bind_pool(pool)

    def __call__(self, inputs: dict) -> np.ndarray:
        out = self.inner(inputs)
        rows = int(np.asarray(inputs["logit_rows"]).size)
        mine = self.comm.rank == self.root
        logits = np.ascontiguousarray(out, np.float32) if mine else np.empty((rows, self.vocab), np.float32)
        self.comm.broadcast(logits, root=self.root)
        return logits

    def greedy(self, inputs: dict) -> np.ndarray:
        return np.argmax(self(inputs), axis=1)

    def done(self) -> None:
        self.inner.done()


__all__ = ["PipelineStep"]
