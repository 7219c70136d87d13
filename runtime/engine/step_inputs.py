"""The step function's inputs for one ragged batch, shared by the token loop (generate.py)
and the serving engine (runtime/serve): the tokens of every sequence on one axis, their
positions, the page metadata, and which rows get logits. Pages must already be reserved."""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import numpy as np

from .kv_cache import PagePool, SequenceKv


class HasKv(Protocol):
    tokens: list[int]
    kv: SequenceKv


S = TypeVar("S", bound=HasKv)


def step_inputs(batch: Sequence[tuple[S, int]], pool: PagePool) -> tuple[dict, list[S]]:
    """(sequence, tokens it brings) in step order -> inputs by name, and the sequences that get
    a logits row (in row order): those whose known tokens are all in the cache after this step."""
    toks, pos, starts, lens, rows, sampled = [], [], [0], [], [], []
    for s, n in batch:
        a = s.kv.length
        toks.extend(s.tokens[a:a + n])
        pos.extend(range(a, a + n))
        starts.append(starts[-1] + n)
        lens.append(a + n)
        if a + n == len(s.tokens):
            rows.append(starts[-1] - 1)
            sampled.append(s)
    cols = max(len(s.kv.pages) for s, _ in batch)
    table = np.zeros((len(batch), cols), np.int32)
    for r, (s, _) in enumerate(batch):
        table[r, :len(s.kv.pages)] = s.kv.pages
    inputs = {"tokens": np.asarray(toks, np.int64), "positions": np.asarray(pos, np.int64),
              "logit_rows": np.asarray(rows or [0], np.int64), "page_table": table,
              "kv_lens": np.asarray(lens, np.int32), "q_starts": np.asarray(starts, np.int32)}
    for i, c in enumerate(pool.caches):
        inputs[f"kv_cache.{i}"] = c
    return inputs, sampled


__all__ = ["step_inputs"]
