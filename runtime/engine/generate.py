"""Text generation over a compiled step function and a paged KV cache.

Every step is one call of the step function over a ragged batch: sequences still reading
their prompt bring a chunk of it, the others bring their last token. A sequence whose
known tokens are all in the cache after the step gets its logits row and one new token.
Prompts of different lengths share steps from the first; a finished sequence leaves and
gives back its pages at once. (The serving engine's scheduler builds on the same loop.)

Admission reserves each sequence's worst case (prompt + max_new_tokens, capped at the
context) against the pool, so a sequence once started never runs out of pages; pages are
still taken only as the sequence grows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ...errors import InputError
from .kv_cache import KvExhausted, PagePool, SequenceKv, waste
from .sampler import SamplingParams, argmax_only, sample
from .step_inputs import step_inputs

StepFn = Callable[[dict], np.ndarray]  # inputs by name -> logits [rows, vocab]
GreedyFn = Callable[[dict], np.ndarray]  # inputs by name -> each logits row's argmax [rows]


@dataclass(frozen=True)
class StepLimits:
    max_tokens: int  # tokens per step
    max_seqs: int  # sequences per step
    max_context: int  # positions per sequence
    vocab: int


@dataclass
class _Seq:
    index: int
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    rng: np.random.Generator
    kv: SequenceKv
    reserved: int
    done: bool = False
    finish: str = ""

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class Generation:
    """One prompt's result: the new token ids, why it stopped, and the text if decodable."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop id), "length" (max_new_tokens or the context)
    text: str | None = None


@dataclass
class StepStats:
    steps: int = 0
    tokens: int = 0
    peak_alloc_slots: int = 0  # KV slots in the pages held, at the step where that peaked
    peak_used_slots: int = 0  # positions actually written then
    alloc_slot_steps: int = 0  # summed over steps: KV slots held and slots written
    used_slot_steps: int = 0

    @property
    def waste(self) -> float:
        """Fraction of the KV slots held that held no token, averaged over the steps."""
        return 1 - self.used_slot_steps / self.alloc_slot_steps if self.alloc_slot_steps else 0.0


def check_prompt(ids: Sequence[int], limits: StepLimits, where: str) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise InputError(f"{where}: empty prompt")
    bad = [i for i in ids if not 0 <= i < limits.vocab]
    if bad:
        raise InputError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {limits.vocab})")
    if len(ids) >= limits.max_context:
        raise InputError(f"{where}: {len(ids)} tokens leave no room to generate in the compiled context of "
                         f"{limits.max_context} positions")
    return ids


class TokenLoop:
    """Runs prompts to completion; `run()` yields (prompt index, token id) as tokens come."""

    def __init__(self, step: StepFn, pool: PagePool, limits: StepLimits, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams], greedy: GreedyFn | None = None):
        """greedy: the step returning each logits row's argmax instead of the rows (on a GPU, computed
        there: 4 bytes a row come back instead of a vocabulary's worth), used for the steps whose
        sampled sequences all take the argmax (sampler.argmax_only)."""
        self.step, self.pool, self.limits, self.greedy = step, pool, limits, greedy
        self.stats = StepStats()
        self.waiting: list[_Seq] = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            ids = check_prompt(ids, limits, f"prompt {i}")
            worst = min(len(ids) + p.max_new_tokens, limits.max_context)
            need = pool.pages_for(worst)
            if need > pool.num_pages:
                raise KvExhausted(f"prompt {i}: {worst} positions need {need} KV pages; the pool has "
                                  f"{pool.num_pages} (load with a larger kv_memory)")
            seed = p.seed if p.seed is not None else np.random.SeedSequence().entropy
            self.waiting.append(_Seq(i, ids, len(ids), p, np.random.default_rng(seed), SequenceKv(pool), need))
        self.running: list[_Seq] = []
        self.reserved = 0
        self.finished: dict[int, _Seq] = {}

    def _admit(self, group: list[_Seq] | None = None, limit: int | None = None) -> None:
        """Waiting sequences start, in order, while their KV reservations fit: up to the step's
        sequence limit, or with `group` (a micro-batch, pp_loop.py) until it holds `limit`."""
        group = self.running if group is None else group
        limit = self.limits.max_seqs if limit is None else limit
        while self.waiting and len(group) < limit:
            s = self.waiting[0]
            if self.reserved + s.reserved > self.pool.num_pages:
                break
            self.waiting.pop(0)
            self.reserved += s.reserved
            self.running.append(s)
            if group is not self.running:
                group.append(s)

    def _batch(self, seqs: Sequence[_Seq]) -> list[tuple[_Seq, int]]:
        """(sequence, tokens it brings) under the step's token budget; decodes first."""
        budget = self.limits.max_tokens
        out = []
        for s in sorted(seqs, key=lambda s: len(s.tokens) - s.kv.length):
            if budget == 0:
                break
            n = min(len(s.tokens) - s.kv.length, budget)
            out.append((s, n))
            budget -= n
        return out

    def _inputs(self, batch: list[tuple[_Seq, int]]) -> tuple[dict, list[_Seq]]:
        for s, n in batch:
            s.kv.reserve(s.kv.length + n)
        return step_inputs(batch, self.pool)

    def _finish(self, s: _Seq, reason: str) -> None:
        s.done, s.finish = True, reason
        self.running.remove(s)
        self.reserved -= s.reserved
        s.kv.release()
        self.finished[s.index] = s

    def run(self) -> Iterator[tuple[int, int]]:
        while self.waiting or self.running:
            self._admit()
            if not self.running:  # cannot happen: admission checked each sequence fits an empty pool
                raise KvExhausted("no sequence fits the KV pool")
            batch = self._batch(self.running)
            inputs, sampled = self._inputs(batch)
            tokens = self._step_tokens(inputs, sampled)
            self._advance(batch)
            yield from self._take(sampled, tokens)

    def _step_tokens(self, inputs: dict, sampled: list[_Seq]) -> list[int]:
        """Runs the step; the next token of each sampled sequence."""
        if self.greedy is not None and sampled and all(argmax_only(s.params) for s in sampled):
            return [int(t) for t in self.greedy(inputs)]
        logits = self.step(inputs)
        tokens = []
        for r, s in enumerate(sampled):
            seen = np.asarray(s.tokens, np.int64) if s.params.repetition_penalty != 1.0 else np.empty(0, np.int64)
            tokens.append(sample(logits[r], s.params, s.rng, seen))
        return tokens

    def _advance(self, batch: list[tuple[_Seq, int]]) -> None:
        for s, n in batch:
            s.kv.length += n
        self._account(batch)

    def _take(self, sampled: list[_Seq], tokens) -> Iterator[tuple[int, int]]:
        """Each sampled sequence's new token: appended, yielded, and the sequence ended at a stop id
        or its length."""
        for s, t in zip(sampled, tokens):
            t = int(t)
            s.tokens.append(t)
            yield s.index, t
            if t in s.params.stop_token_ids:
                self._finish(s, "stop")
            elif len(s.new_tokens) >= s.params.max_new_tokens or len(s.tokens) >= self.limits.max_context:
                self._finish(s, "length")

    def _account(self, batch) -> None:
        st = self.stats
        st.steps += 1
        st.tokens += sum(n for _, n in batch)
        alloc, used = waste([s.kv for s in self.running])
        st.alloc_slot_steps += alloc
        st.used_slot_steps += used
        if alloc > st.peak_alloc_slots:
            st.peak_alloc_slots, st.peak_used_slots = alloc, used


__all__ = ["TokenLoop", "StepLimits", "Generation", "StepFn", "check_prompt"]
