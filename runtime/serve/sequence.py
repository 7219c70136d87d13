"""A request and the sequences it samples (n of them), as the engine thread tracks them,
and the events it sends back to the request's owner."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..engine.sampler import SamplingParams
from .block_manager import SeqKv, Swapped
from .text import TextStream


class State(enum.Enum):
    WAITING = "waiting"  # holds no K/V: not started, or preempted to be recomputed
    RUNNING = "running"  # holds pages
    SWAPPED = "swapped"  # its K/V is on the host
    FINISHED = "finished"


@dataclass(frozen=True)
class Event:
    """One new token of one sequence (and/or its end). `text` is the new text (None without
    a tokenizer); text held back (a possible stop string, a half character) comes later."""

    request_id: str
    index: int  # which of the request's n sequences
    token_id: int | None
    text: str | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    error: str | None = None  # the engine failed; the sequence is over


Sink = Callable[[Event], None]


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    arrival: float
    seqs: list["Seq"] = field(default_factory=list)
    started: bool = False  # some sequence got a step (it no longer counts against the queue bound)
    open: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(eq=False)
class Seq:
    request: Request
    index: int
    tokens: list[int]
    rng: np.random.Generator
    order: int  # arrival order, the FCFS key and every policy's tie-break
    text: TextStream | None
    kv: SeqKv = field(default_factory=SeqKv)
    state: State = State.WAITING
    swapped: Swapped | None = None
    finish: str | None = None
    # skip-join MLFQ
    level: int = 0
    level_service: float = 0.0
    last_run: int = 0
    # timing (time.perf_counter seconds)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def known(self) -> int:
        """Positions whose K/V exist (on pages or on the host)."""
        return self.swapped.length if self.swapped is not None else self.kv.length

    def todo(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.tokens) - self.known()


__all__ = ["State", "Event", "Sink", "Request", "Seq"]
