"""The serving engine: continuous batching over one compiled step function.

One background thread owns the model, the page pool and every sequence. Requests come in
through a thread-safe inbox (submit / abort from any thread); each iteration the thread
takes what arrived, asks the scheduler for a plan, makes one `llm.step_logits` call over
the whole mixed batch (prompt chunks and decodes of many requests), samples one token
for each sequence that finished its known tokens, and sends events back through each
request's sink. A sequence that finishes leaves at once and a waiting one joins at the
next step (Orca's iteration-level scheduling).

The LLM is duck-typed: `step_logits(inputs) -> logits`, `pool` (a PagePool), `limits`,
`spec.stop_token_ids`, `decode(ids)`, `tokenizer`; a GPU LLM with a device pool fits.

    engine = Engine(llmc.load("tiny.llmc"), EngineConfig(policy="mlfq")).start()
    out = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=8))      # blocking
    async for ev in engine.submit_async(ids, params): ...                     # asyncio
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import numpy as np

from ...errors import InputError, LLMCError
from ..engine.sampler import SamplingParams, argmax_only, log_softmax, sample, top_logprobs
from .block_manager import BlockManager
from .metrics import EngineMetrics, render
from .policy import make_policy
from .scheduler import PreemptionCost, Scheduler, SchedulerConfig
from .sequence import Event, Request, Seq, Sink, State
from ..engine.step_inputs import step_inputs
from .text import TextStream

log = logging.getLogger("llmc.serve")


class QueueFull(LLMCError):
    """More requests wait than the engine's max_queue allows (HTTP 429)."""


class EngineStopped(LLMCError):
    """The engine takes no new requests (shutting down, or it failed)."""


@dataclass(frozen=True)
class EngineConfig:
    policy: str = "fcfs"  # fcfs | mlfq
    max_num_batched_tokens: int | None = None  # tokens per step; default the step function's limit
    max_num_seqs: int | None = None  # sequences per step; default the step function's limit
    chunked_prefill: bool = True
    prefix_cache: bool = True
    preemption: str = "auto"  # auto (by cost) | swap | recompute
    swap_space: int = 4 << 30  # bytes of host memory for swapped-out K/V
    max_queue: int = 1024  # requests accepted but not yet started; more get QueueFull


@dataclass
class SeqResult:
    """One finished sequence, as `Engine.generate` returns it."""

    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None


class Engine:
    def __init__(self, llm: Any, config: EngineConfig = EngineConfig()):
        self.llm, self.config = llm, config
        lim = llm.limits
        tokens = lim.max_tokens if config.max_num_batched_tokens is None else config.max_num_batched_tokens
        seqs = lim.max_seqs if config.max_num_seqs is None else config.max_num_seqs
        if tokens > lim.max_tokens or seqs > lim.max_seqs:
            raise InputError(f"max_num_batched_tokens={tokens}, max_num_seqs={seqs}: the step function takes at most "
                             f"{lim.max_tokens} tokens and {lim.max_seqs} sequences per step")
        if config.max_queue < 1:
            raise InputError(f"max_queue must be >= 1, got {config.max_queue}")
        self.pool = llm.pool
        self.blocks = BlockManager(self.pool, config.prefix_cache)
        self.cost = PreemptionCost(config.preemption)
        self.scheduler = Scheduler(SchedulerConfig(tokens, seqs, config.chunked_prefill, config.preemption,
                                                   config.swap_space), make_policy(config.policy), self.blocks,
                                   self.cost)
        self.metrics = EngineMetrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}  # engine thread only
        self._ids = itertools.count()
        self._order = itertools.count()
        self._lock = threading.Lock()  # guards _queued / _accepting against concurrent submits
        self._queued = 0
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.step_no = 0
        self.failure: str | None = None
        self._snapshot = self._count()

    # --- lifecycle
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="llmc-engine", daemon=True)
        self._thread.start()
        return self

    def stop_intake(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish those in flight first, else abort them."""
        self.stop_intake()
        self._inbox.put(("stop", drain))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    # --- intake (any thread)
    def check(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as ids, or InputError: a request the engine could never finish."""
        lim = self.llm.limits
        ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < lim.vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {lim.vocab})")
        if len(ids) >= lim.max_context:
            raise InputError(f"the prompt has {len(ids)} tokens; the model's context is {lim.max_context}, "
                             f"which leaves no room to generate")
        if params.stop and self.llm.tokenizer is None:
            raise InputError("stop strings need a tokenizer; this artifact has none (use stop token ids)")
        worst = min(len(ids) + params.max_new_tokens, lim.max_context)
        if self.pool.pages_for(worst) > self.pool.num_pages:
            raise InputError(f"{worst} positions need {self.pool.pages_for(worst)} KV pages; the KV cache has "
                             f"{self.pool.num_pages} (lower max_tokens, or serve with more KV memory)")
        return ids

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink, request_id: str | None = None) -> str:
        ids = self.check(prompt, params)
        rid = request_id or f"req-{next(self._ids)}"
        with self._lock:
            if not self._accepting or self.failure is not None:
                raise EngineStopped("the engine is not taking requests" +
                                    (f" (it failed: {self.failure})" if self.failure else " (shutting down)"))
            if self._queued >= self.config.max_queue:
                self.metrics.rejected_queue_full += 1
                raise QueueFull(f"{self._queued} requests are waiting (max_queue={self.config.max_queue})")
            self._queued += 1
        self._inbox.put(("add", Request(rid, ids, params, sink, time.perf_counter())))
        return rid

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def generate(self, prompt: Sequence[int], params: SamplingParams, timeout: float | None = None) -> list[SeqResult]:
        """Blocking: the request's n sequences, each to its end."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.submit(prompt, params, q.put)
        out = [SeqResult(text="" if self.llm.tokenizer is not None else None) for _ in range(params.n)]
        open_ = params.n
        while open_:
            try:
                ev = q.get(timeout=timeout)
            except queue.Empty:
                self.abort(rid)
                raise LLMCError(f"request {rid} did not finish in {timeout} s") from None
            open_ -= _collect(out[ev.index], ev)
        return out

    def submit_async(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None
                     ) -> "AsyncRequest":
        """Submit now (errors raise here), then iterate the events with `async for`."""
        return AsyncRequest(self, prompt, params, request_id)

    # --- the engine thread
    def _run(self) -> None:
        try:
            while True:
                self._snapshot = self._count()
                if not self._take_inbox(block=not self.scheduler.active):
                    break
                if self.scheduler.active:
                    self._step()
            self._snapshot = self._count()  # what the last requests left behind
        except Exception as e:  # a bug or a failing step function: every open request learns it, then we stop
            self.failure = f"{type(e).__name__}: {e}"
            log.error("engine failed:\n%s", traceback.format_exc())
            for r in list(self._requests.values()):
                for s in r.seqs:
                    if s.state is not State.FINISHED:
                        r.sink(Event(r.id, s.index, None, None, finish_reason="abort", error=self.failure))
            raise

    def _take_inbox(self, block: bool) -> bool:
        """Apply what arrived; False once a stop is due (drained, or not draining)."""
        while True:
            try:
                kind, arg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block and self._stop and not self.scheduler.active:
                    return False
                if block:
                    continue
                return True
            block = False
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                r = self._requests.get(arg)
                if r is not None:
                    for s in r.seqs:
                        if s.state is not State.FINISHED:
                            self._finish(s, "abort")
            elif kind == "stop":
                self._stop = True
                if not arg:
                    for r in list(self._requests.values()):
                        for s in r.seqs:
                            if s.state is not State.FINISHED:
                                self._finish(s, "abort")
            if self._stop and not self.scheduler.active:
                return False

    def _add(self, r: Request) -> None:
        p = r.params
        base_seed = p.seed if p.seed is not None else np.random.SeedSequence().entropy
        for i in range(p.n):
            text = TextStream(self.llm.decode, p.stop) if self.llm.tokenizer is not None else None
            s = Seq(r, i, list(r.prompt), np.random.default_rng(base_seed + i), next(self._order), text)
            r.seqs.append(s)
            self.scheduler.add(s, self.step_no)
        r.open = p.n
        self._requests[r.id] = r

    def _step(self) -> None:
        self.step_no += 1
        plan = self.scheduler.schedule(self.step_no)
        if not plan.batch:
            raise AssertionError("a step with nothing to run while sequences wait")  # the scheduler's guarantee
        for s, _ in plan.batch:
            if not s.request.started:
                s.request.started = True
                with self._lock:
                    self._queued -= 1
        inputs, sampled = step_inputs(plan.batch, self.pool)
        t = time.perf_counter()
        # greedy rows need only their argmax: with no other row wanting logits the step returns
        # token ids (on a GPU the [rows, vocab] logits then never cross to the host)
        if sampled and all(argmax_only(s.request.params) for s in sampled):
            logits, picked = None, self.llm.step_greedy(inputs)
        else:
            logits, picked = self.llm.step_logits(inputs), None
        now = time.perf_counter()
        prompt_tokens = 0
        for s, n in plan.batch:
            s.kv.length += n
            self.blocks.name_full_pages(s.kv, s.tokens)
            if n > 1:
                prompt_tokens += n
        self.cost.observe_step(prompt_tokens, now - t)
        self.scheduler.served(plan.batch, self.step_no)
        # counted before the tokens go out: a client that saw its last token finds it in /metrics
        self.metrics.step(sum(n for _, n in plan.batch) - len(sampled), len(sampled))
        for row, s in enumerate(sampled):
            if picked is not None:
                self._take(s, int(picked[row]), None, now)
            else:
                self._sample(s, logits[row], now)

    def _sample(self, s: Seq, logits: np.ndarray, now: float) -> None:
        p = s.request.params
        seen = np.asarray(s.tokens, np.int64) if p.repetition_penalty != 1.0 else np.empty(0, np.int64)
        self._take(s, sample(logits, p, s.rng, seen), logits, now)

    def _take(self, s: Seq, tok: int, logits: np.ndarray | None, now: float) -> None:
        """The sequence's next token is `tok` (its logits row given where logprobs need it)."""
        p = s.request.params
        s.tokens.append(tok)
        lp = top = None
        if p.logprobs is not None:
            logp = log_softmax(logits)
            lp, top = float(logp[tok]), tuple(top_logprobs(logp, p.logprobs))
        if s.first_token_at is None:
            s.first_token_at = now
            with self.metrics.lock:
                self.metrics.ttft.observe(now - s.request.arrival)
        s.last_token_at = now
        text, stopped = s.text.push(tok) if s.text is not None else (None, False)
        finish = None
        if tok in p.stop_token_ids or stopped:
            finish = "stop"
        elif s.generated >= p.max_new_tokens or len(s.tokens) >= self.llm.limits.max_context:
            finish = "length"
        if finish is not None and s.text is not None and not stopped:
            text += s.text.flush()
        if finish is not None:
            self._finish(s, finish, announce=False)  # pages back and counted before the client hears of it
        s.request.sink(Event(s.request.id, s.index, tok, text, lp, top, finish))

    def _finish(self, s: Seq, reason: str, announce: bool = True) -> None:
        r = s.request
        if not r.started:
            r.started = True
            with self._lock:
                self._queued -= 1
        self.scheduler.drop(s)
        s.finish = reason
        if announce:
            r.sink(Event(r.id, s.index, None, None, finish_reason=reason))
        if s.first_token_at is not None and s.generated > 1:
            with self.metrics.lock:
                self.metrics.tpot.observe((s.last_token_at - s.first_token_at) / (s.generated - 1))
        r.open -= 1
        if r.open == 0:
            del self._requests[r.id]
            self.metrics.finished(reason)
            if s.last_token_at is not None:
                with self.metrics.lock:
                    self.metrics.e2e.observe(s.last_token_at - r.arrival)

    # --- observability: the engine thread counts after each iteration, any thread reads the
    # last count (walking the engine's dicts from another thread could see them change size)
    def snapshot(self) -> dict[str, int]:
        return self._snapshot

    def _count(self) -> dict[str, int]:
        active = self.scheduler.active
        states = [s.state for s in active]
        return {
            "waiting": sum(1 for s in active if s.state is State.WAITING and s.generated == 0 and not s.kv.pages),
            "running": states.count(State.RUNNING),
            "swapped": states.count(State.SWAPPED),
            "preempted": sum(1 for s in active if s.state is State.SWAPPED
                             or (s.state is State.WAITING and s.generated > 0)),
            "kv_pages_total": self.pool.num_pages,
            "kv_pages_free": self.pool.free_pages,
            "kv_pages_used": self.pool.used_pages - len(self.blocks.cached),
            "kv_pages_cached": len(self.blocks.cached),
            "kv_pages_shared": self.blocks.shared_pages,
        }

    def metrics_text(self) -> str:
        snap, m, c, ps = self.snapshot(), self.metrics, self.scheduler.counts, self.blocks.stats
        gauges = {
            "num_requests_waiting": ("sequences not started yet", snap["waiting"]),
            "num_requests_running": ("sequences holding KV pages", snap["running"]),
            "num_requests_swapped": ("sequences whose KV is swapped out to host memory", snap["swapped"]),
            "num_requests_preempted": ("preempted sequences not yet resumed (swapped or to recompute)",
                                       snap["preempted"]),
            "queue_waiting_requests": ("accepted requests not yet started (bounded by max_queue)", self._queued),
            "kv_pages_total": ("KV cache pages", snap["kv_pages_total"]),
            "kv_pages_used": ("KV pages held by sequences", snap["kv_pages_used"]),
            "kv_pages_free": ("KV pages free or cached but evictable", snap["kv_pages_free"]
                              + snap["kv_pages_cached"]),
            "kv_pages_cached": ("prefix-cache pages no sequence holds (evictable)", snap["kv_pages_cached"]),
            "kv_pages_shared": ("KV pages held by more than one sequence", snap["kv_pages_shared"]),
            "swap_space_used_bytes": ("host memory holding swapped-out KV", self.scheduler.swap_used),
            "generation_tokens_per_second": ("generated tokens per second over the last 10 s",
                                             m.tokens.per_second(time.perf_counter())),
        }
        rss = resident_bytes()
        if rss is not None:
            gauges["process_resident_memory_bytes"] = ("the server process's resident memory", rss)
        counters = {
            "prompt_tokens_total": ("prompt tokens computed", m.prompt_tokens),
            "generation_tokens_total": ("tokens generated", m.generation_tokens),
            "steps_total": ("step-function calls", m.steps),
            'preemptions_total{mode="swap"}': ("sequences preempted", c.swap),
            'preemptions_total{mode="recompute"}': ("sequences preempted", c.recompute),
            "swap_in_total": ("swapped sequences copied back", c.swap_in),
            "swapped_out_pages_total": ("KV pages copied out to host memory", c.swapped_pages),
            "recomputed_tokens_total": ("K/V positions dropped by recompute preemption", c.recomputed_tokens),
            "prefix_cache_queried_tokens_total": ("prompt tokens looked up in the prefix cache", ps.queried_tokens),
            "prefix_cache_hit_tokens_total": ("prompt tokens whose K/V came from the prefix cache", ps.hit_tokens),
            "prefix_cache_evicted_pages_total": ("cached pages evicted for room", ps.evicted_pages),
            "rejected_queue_full_total": ("requests refused because the queue was full", m.rejected_queue_full),
        }
        with m.lock:
            finished = sorted(m.requests_finished.items())
        for reason, n in finished:
            counters[f'requests_finished_total{{reason="{reason}"}}'] = ("requests finished", n)
        return render(gauges, counters, m)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _collect(out: SeqResult, ev: Event) -> int:
    """Fold an event into a result; 1 if it ended the sequence."""
    if ev.error:
        raise LLMCError(f"the engine failed: {ev.error}")
    if ev.token_id is not None:
        out.token_ids.append(ev.token_id)
        if ev.logprob is not None:
            out.logprobs.append(ev.logprob)
            out.top_logprobs.append(ev.top_logprobs)
    if ev.text is not None:
        out.text += ev.text
    if ev.finish_reason is not None:
        out.finish_reason = ev.finish_reason
        return 1
    return 0


class AsyncRequest:
    """A submitted request's events for asyncio. Leaving early aborts it (its pages go back)
    once the iterator is closed: at once with `contextlib.aclosing(req.__aiter__())` or
    `req.cancel()`, else when asyncio finalizes the generator."""

    def __init__(self, engine: Engine, prompt: Sequence[int], params: SamplingParams, request_id: str | None):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.open = params.n
        self.id = engine.submit(prompt, params, self._put, request_id)

    def _put(self, ev: Event) -> None:  # on the engine thread
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        try:
            while self.open:
                ev = await self.queue.get()
                if ev.finish_reason is not None:
                    self.open -= 1
                yield ev
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self.open:
            self.open = 0
            self.engine.abort(self.id)


__all__ = ["Engine", "EngineConfig", "SeqResult", "AsyncRequest", "QueueFull", "EngineStopped"]
