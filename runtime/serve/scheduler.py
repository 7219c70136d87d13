"""One step's plan: which sequences run, how many tokens each brings, who is preempted.

Each step the policy orders every unfinished sequence. The first max_num_seqs get the
step's slots. Of the token budget (max_num_batched_tokens), one token per decode is set
aside first; prompt chunks share the rest (SARATHI's chunked prefill: a long prompt shares
steps with running decodes instead of stalling them). Without chunked prefill, whole
prompts go first in steps of their own and decodes wait (vLLM's scheduling before
chunking). Sequences are then served in priority order, and budget is spent only by a
sequence that got its pages, so one that finds none holds up nobody else's tokens.

Pages are taken just in time, in priority order. When there are not enough, the
lowest-priority sequence holding pages is preempted, provided it ranks below the one
asking; if none does, a prompt chunk shrinks to the pages there are, and anything else
waits a step. A sequence that holds no pages yet (new, swapped out, or to recompute)
preempts only where the policy says its class outranks the victim's (never under fcfs;
a higher queue under mlfq): otherwise a resumed sequence would push out the next one,
which would push out the next, every step. Once such a sequence finds no room, no
lower-ranked one starts this step, so a big old request is not starved by small new
ones. The highest-priority sequence can always preempt every other one, and no request
is accepted whose worst case exceeds the whole pool, so an accepted request is never
failed for lack of KV memory.

Preemption cost rule (PreemptionCost.choose): swapping moves the sequence's pages to the
host and back, 2 * bytes / copy bandwidth; recomputing feeds its known tokens through
the model again, tokens * seconds per prompt token. Both rates are measured as the engine
runs (moving averages, starting from conservative guesses). The cheaper one is taken;
a swap that would overflow the host swap space recomputes instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...errors import InputError
from .block_manager import BlockManager
from .sequence import Seq, State

PREEMPTION_MODES = ("auto", "swap", "recompute")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    chunked_prefill: bool = True
    preemption: str = "auto"
    swap_space: int = 4 << 30  # bytes of host memory for swapped K/V

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise InputError(f"max_num_batched_tokens and max_num_seqs must be >= 1, got {self}")
        if self.preemption not in PREEMPTION_MODES:
            raise InputError(f"preemption must be one of {PREEMPTION_MODES}, got {self.preemption!r}")
        if self.swap_space < 0:
            raise InputError(f"swap_space must be >= 0 bytes, got {self.swap_space}")


@dataclass
class PreemptionCost:
    mode: str = "auto"
    prompt_token_s: float = 1e-3  # seconds per prompt token (guess until measured)
    copy_bytes_s: float = 1e9  # host copy bandwidth (guess until measured)
    smoothing: float = 0.2

    def observe_step(self, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens >= 16:  # steps of mostly prompt tokens measure the recompute rate
            self.prompt_token_s += self.smoothing * (seconds / prompt_tokens - self.prompt_token_s)

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        if nbytes and seconds > 0:
            self.copy_bytes_s += self.smoothing * (nbytes / seconds - self.copy_bytes_s)

    def choose(self, tokens: int, nbytes: int, swap_room: int) -> str:
        if self.mode != "auto":
            return self.mode if self.mode == "recompute" or nbytes <= swap_room else "recompute"
        if nbytes > swap_room:
            return "recompute"
        return "swap" if 2 * nbytes / self.copy_bytes_s <= tokens * self.prompt_token_s else "recompute"


@dataclass
class Plan:
    batch: list[tuple[Seq, int]] = field(default_factory=list)
    preempted: list[tuple[Seq, str]] = field(default_factory=list)
    preempted_ids: set[int] = field(default_factory=set)
    swapped_in: list[Seq] = field(default_factory=list)


@dataclass
class PreemptionCounts:
    swap: int = 0
    recompute: int = 0
    swap_in: int = 0
    swapped_pages: int = 0  # pages copied out, in all
    recomputed_tokens: int = 0  # K/V dropped, to be computed again


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy, blocks: BlockManager, cost: PreemptionCost):
        self.config, self.policy, self.blocks, self.cost = config, policy, blocks, cost
        self.active: list[Seq] = []
        self.swap_used = 0  # bytes
        self.counts = PreemptionCounts()

    def add(self, s: Seq, step: int) -> None:
        s.last_run = step
        self.policy.admit(s)
        self.active.append(s)

    def drop(self, s: Seq) -> None:
        """A sequence is over (finished or aborted): its pages or host copy go."""
        if s.swapped is not None:
            self.swap_used -= s.swapped.pages * self.blocks.pool.layout.page_bytes
            s.swapped = None
        self.blocks.release(s.kv)
        s.state = State.FINISHED
        self.active.remove(s)

    # --- planning
    def schedule(self, step: int) -> Plan:
        self.policy.age(self.active, step)
        order = sorted(self.active, key=self.policy.key)
        rank = {id(s): i for i, s in enumerate(order)}
        chosen = order[:self.config.max_num_seqs]
        out = Plan()
        budget = self.config.max_num_batched_tokens
        if self.config.chunked_prefill:
            # decodes' tokens are set aside first; prompt chunks share the rest. Budget is
            # spent only on what got its pages, so a prompt that finds none starves nobody.
            decodes = min(budget, sum(1 for s in chosen if s.todo() == 1))
            self._fill(chosen, rank, order, out, {"decode": decodes, "prompt": budget - decodes}, whole=False)
        else:
            self._fill([s for s in chosen if s.todo() > 1], rank, order, out, {"decode": 0, "prompt": budget},
                       whole=True)
            if not out.batch:  # decodes get the steps without prompts
                self._fill([s for s in chosen if s.todo() == 1], rank, order, out, {"decode": budget, "prompt": 0},
                           whole=True)
        if not out.batch:
            # The chosen could not start: no free pages, and no victim their policy lets them take
            # (MLFQ: a new job does not preempt an equal one). The pages are then held by resident
            # sequences ranked past max_num_seqs (demoted ones): they go on, or nothing ever would.
            resident = [s for s in order if s.state is State.RUNNING and s.kv.pages][:self.config.max_num_seqs]
            decodes = min(budget, sum(1 for s in resident if s.todo() == 1))
            self._fill(resident, rank, order, out, {"decode": decodes, "prompt": budget - decodes}, whole=False)
        return out

    def _fill(self, candidates: list[Seq], rank: dict, order: list[Seq], out: Plan, budget: dict[str, int],
              whole: bool) -> None:
        """Candidates in priority order into the batch, each with its pages."""
        blocked = False  # a sequence without pages found no room: none ranked below it starts
        for s in candidates:
            if id(s) in out.preempted_ids:  # preempted for a higher-priority sequence this step
                continue
            t = s.todo()
            kind = "decode" if t == 1 else "prompt"
            room = budget[kind]
            if room == 0:
                continue
            if whole and t > room:
                if out.batch:
                    break  # the prompt waits for a step of its own, and those after it too (FCFS)
                n = room  # longer than a whole step: it has to be cut all the same
            else:
                n = min(t, room)
            resident = s.state is State.RUNNING
            if blocked and not resident:
                continue
            n = self._secure(s, n, rank, order, out)
            if n:
                out.batch.append((s, n))
                budget[kind] -= n
            else:
                blocked |= not resident

    def _secure(self, s: Seq, n: int, rank: dict, order: list[Seq], out: Plan) -> int:
        """Pages for s to take n more tokens, preempting lower-priority sequences if needed;
        returns the tokens it can take (a prompt chunk may shrink), 0 to skip this step."""
        b = self.blocks
        if s.state is State.WAITING and not s.kv.pages:
            s.request.cached_tokens += b.adopt_prefix(s.kv, s.tokens)
            if s.kv.pages:
                s.state = State.RUNNING
            n = min(n, s.todo())
        if s.state is State.SWAPPED:
            need = max(s.swapped.pages, b.pool.pages_for(s.swapped.length + n))
        else:
            need = b.pages_needed(s.kv, s.kv.length + n)
        resident = s.state is State.RUNNING
        while b.available() < need:
            v = self._victim(s, rank, order, resident)
            if v is None:
                break
            self._preempt(v, out)
        if b.available() < need:
            if s.state is State.SWAPPED or s.todo() == 1:
                return 0
            n = min(n, (len(s.kv.pages) + b.available()) * b.page - s.kv.length)
            if n <= 0:
                return 0
        if s.state is State.SWAPPED:
            self._swap_in(s)
            out.swapped_in.append(s)
        if not b.grow(s.kv, s.kv.length + n):
            raise AssertionError("pages counted as available could not be taken")  # a bookkeeping bug
        s.state = State.RUNNING
        return n

    def _victim(self, s: Seq, rank: dict, order: list[Seq], resident: bool) -> Seq | None:
        for v in reversed(order):
            if rank[id(v)] <= rank[id(s)]:
                return None
            if v.state is State.RUNNING and v.kv.pages:
                return v if resident or self.policy.outranks(s, v) else None
        return None

    def _preempt(self, v: Seq, out: Plan) -> None:
        b = self.blocks
        nbytes = b.pool.pages_for(v.kv.length) * b.pool.layout.page_bytes
        mode = self.cost.choose(v.kv.length, nbytes, self.config.swap_space - self.swap_used)
        if mode == "swap" and v.kv.length:
            t = time.perf_counter()
            v.swapped = b.swap_out(v.kv)
            self.cost.observe_copy(nbytes, time.perf_counter() - t)
            self.swap_used += nbytes
            v.state = State.SWAPPED
            self.counts.swap += 1
            self.counts.swapped_pages += v.swapped.pages
        else:
            mode = "recompute"
            self.counts.recompute += 1
            self.counts.recomputed_tokens += v.kv.length
            b.release(v.kv)
            v.state = State.WAITING
        out.preempted.append((v, mode))
        out.preempted_ids.add(id(v))

    def _swap_in(self, s: Seq) -> None:
        t = time.perf_counter()
        sw = s.swapped
        self.blocks.swap_in(s.kv, sw, s.tokens)
        nbytes = sw.pages * self.blocks.pool.layout.page_bytes
        self.cost.observe_copy(nbytes, time.perf_counter() - t)
        self.swap_used -= nbytes
        s.swapped = None
        self.counts.swap_in += 1

    def served(self, batch: list[tuple[Seq, int]], step: int) -> None:
        """After a step: the policy counts each sequence's service."""
        for s, n in batch:  # a chunk of several tokens is prompt work (or a recompute), one token a decode
            self.policy.served(s, n if n > 1 else 0, 1 if n == 1 else 0, step)


__all__ = ["Scheduler", "SchedulerConfig", "PreemptionCost", "Plan", "PreemptionCounts", "PREEMPTION_MODES"]
