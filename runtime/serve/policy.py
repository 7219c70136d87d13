"""Scheduling policies: the order in which sequences get a step's slots, tokens and pages.

- fcfs: arrival order. A newer sequence never displaces an older one.
- mlfq: FastServe's skip-join multi-level feedback queue. Queue i has a quantum of
  base_quantum * 2**i units of service. A job joins the highest queue whose quantum covers
  its prompt (skip-join: a long prompt skips the top queues instead of being demoted
  through them) and is demoted one queue each time it uses up its queue's quantum. Lower
  queues run only when higher ones leave room (slots, tokens, pages); a job that has not
  run for starve_steps steps goes back to the top queue (FastServe's starvation guard).
  Service: a generated token counts 1, a prompt token 1 / prefill_ratio (a prompt token
  costs a fraction of a decode step, since prompt tokens share the weights' reads).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError
from .sequence import Seq


class Fcfs:
    name = "fcfs"

    def key(self, s: Seq) -> tuple:
        return (s.order,)

    def outranks(self, s: Seq, v: Seq) -> bool:
        """May s, holding no pages, preempt v for them? Under FCFS a newcomer never displaces."""
        return False

    def admit(self, s: Seq) -> None:
        pass

    def served(self, s: Seq, prompt_tokens: int, generated_tokens: int, step: int) -> None:
        s.last_run = step

    def age(self, seqs: list[Seq], step: int) -> None:
        pass


@dataclass
class SkipJoinMlfq:
    levels: int = 4
    base_quantum: float = 16.0
    prefill_ratio: float = 8.0
    starve_steps: int = 400
    name: str = "mlfq"

    def __post_init__(self) -> None:
        if self.levels < 1 or self.base_quantum <= 0 or self.prefill_ratio <= 0 or self.starve_steps < 1:
            raise InputError(f"mlfq: levels, base_quantum, prefill_ratio, starve_steps must be positive, got {self}")

    def quantum(self, level: int) -> float:
        return self.base_quantum * 2 ** level

    def key(self, s: Seq) -> tuple:
        return (s.level, s.order)

    def outranks(self, s: Seq, v: Seq) -> bool:
        """A job of a higher queue may take a lower queue's pages (FastServe's preemption)."""
        return s.level < v.level

    def admit(self, s: Seq) -> None:
        cost = s.prompt_len / self.prefill_ratio
        s.level = next((i for i in range(self.levels) if cost <= self.quantum(i)), self.levels - 1)
        s.level_service = 0.0

    def served(self, s: Seq, prompt_tokens: int, generated_tokens: int, step: int) -> None:
        s.last_run = step
        s.level_service += prompt_tokens / self.prefill_ratio + generated_tokens
        if s.level_service >= self.quantum(s.level) and s.level < self.levels - 1:
            s.level += 1
            s.level_service = 0.0

    def age(self, seqs: list[Seq], step: int) -> None:
        for s in seqs:
            if s.level and step - s.last_run > self.starve_steps:
                s.level, s.level_service, s.last_run = 0, 0.0, step


def make_policy(name: str):
    if name == "fcfs":
        return Fcfs()
    if name == "mlfq":
        return SkipJoinMlfq()
    raise InputError(f"unknown scheduling policy {name!r} (fcfs or mlfq)")


__all__ = ["Fcfs", "SkipJoinMlfq", "make_policy"]
