"""Running one pipeline stage in a generation loop that every stage runs alike.

Each stage's process runs the same TokenLoop (the same scheduling, the same sampling, seeded
alike); a step runs the stage's program, whose RECV waits for the previous stage's activations
and whose SEND hands them on, and then the last stage broadcasts the logits, so every stage picks
the same tokens and feeds the same next step. The pools agree on their page count (the first
stage's), since which sequences fit decides the schedule. Micro-batches in flight (stage s on
step t+1 while s+1 is on step t) are not done yet: one step is in flight at a time.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class PipelineStep:
    def __init__(self, inner, comm, stage: int, stages: int, vocab: int, root: int | None = None):
        """comm: the whole job's communicator; root: the rank whose logits every rank takes (the
        last stage's; default stages - 1, the last stage of a job of stages alone)."""
        self.inner, self.comm = inner, comm
        self.stage, self.stages, self.vocab = stage, stages, vocab
        self.root = stages - 1 if root is None else root
        self.device = inner.device

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
