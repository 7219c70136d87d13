"""Which replica takes the next request: the one with the least outstanding tokens.

A request's outstanding tokens are the work it still asks of its replica: its prompt
tokens until its first token comes back (the prefill is then done), plus its max_tokens
less the tokens it has produced so far. A replica's load is the sum over its requests in
flight. Ties go to the replica with fewer requests in flight, then to the one chosen
longest ago (so an idle set of replicas is walked round-robin).

The router only keeps books; it runs on the front's event loop (one thread), so it takes
no locks. Replicas that are down (starting, dead, restarting) are never chosen.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class ReplicaLoad:
    index: int
    up: bool = False
    outstanding: int = 0  # tokens, summed over the requests in flight
    in_flight: int = 0
    routed: int = 0  # requests sent here, ever
    last_pick: int = -1  # the router's clock at the last choice
    tickets: set["Ticket"] = field(default_factory=set)


class Ticket:
    """One request in flight on one replica; its share of the replica's load shrinks as
    its tokens come back and is given back whole by `close` (idempotent)."""

    def __init__(self, load: ReplicaLoad, prompt_tokens: int, max_tokens: int):
        self.load = load
        self.prompt = max(0, prompt_tokens)
        self.remaining = max(0, max_tokens)
        self.open = True
        load.outstanding += self.cost
        load.in_flight += 1
        load.tickets.add(self)

    @property
    def replica(self) -> int:
        return self.load.index

    @property
    def cost(self) -> int:
        return self.prompt + self.remaining

    def produced(self, tokens: int = 1) -> None:
        """`tokens` more came back: the prompt is read, and that many fewer remain."""
        if not self.open or tokens <= 0:
            return
        before = self.cost
        self.prompt = 0
        self.remaining = max(0, self.remaining - tokens)
        self.load.outstanding -= before - self.cost

    def close(self) -> None:
        if self.open:
            self.open = False
            self.load.outstanding -= self.cost
            self.load.in_flight -= 1
            self.load.tickets.discard(self)


class Router:
    def __init__(self, replicas: int):
        self.loads = [ReplicaLoad(i) for i in range(replicas)]
        self._clock = itertools.count()

    def set_up(self, index: int, up: bool) -> None:
        self.loads[index].up = up

    def order(self, exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """Replicas that are up, best first."""
        up = [r for r in self.loads if r.up and r.index not in exclude]
        return [r.index for r in sorted(up, key=lambda r: (r.outstanding, r.in_flight, r.last_pick))]

    def choose(self, exclude: frozenset[int] | set[int] = frozenset()) -> int | None:
        best = self.order(exclude)
        return best[0] if best else None

    def admit(self, index: int, prompt_tokens: int, max_tokens: int) -> Ticket:
        load = self.loads[index]
        load.routed += 1
        load.last_pick = next(self._clock)
        return Ticket(load, prompt_tokens, max_tokens)

    def drop_all(self, index: int) -> list[Ticket]:
        """A replica went away: close the books of everything it had in flight."""
        tickets = list(self.loads[index].tickets)
        for t in tickets:
            t.close()
        return tickets


__all__ = ["Router", "Ticket", "ReplicaLoad"]
