"""Counters and histograms the engine keeps, written out in Prometheus' text format
(hand-written: a few lines do not justify a dependency)."""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque

# seconds; TTFT spans queueing and prefill, TPOT one decode step
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip([*(repr(b) for b in self.buckets), "+Inf"], self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Rate:
    """Events per second over the last `window` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.events: deque[tuple[float, int]] = deque()

    def add(self, n: int, now: float) -> None:
        self.events.append((now, n))
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()

    def per_second(self, now: float) -> float:
        total = sum(n for t, n in self.events if t >= now - self.window)
        return total / self.window


class EngineMetrics:
    """Written by the engine thread, read by the HTTP thread: the lock keeps a scrape from
    seeing half an update of a histogram."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)
        self.tokens = Rate()
        self.requests_finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.rejected_queue_full = 0

    def finished(self, reason: str) -> None:
        with self.lock:
            self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1

    def step(self, prompt_tokens: int, generated: int) -> None:
        with self.lock:
            self.steps += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            self.tokens.add(generated, time.perf_counter())


def render(gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, float]], m: EngineMetrics,
           prefix: str = "llmc") -> str:
    """gauges / counters: name -> (help, value); names may carry {labels}."""
    lines: list[str] = []
    seen: set[str] = set()

    def head(name: str, kind: str, help_: str) -> None:
        base = name.split("{")[0]
        if base not in seen:
            seen.add(base)
            lines.extend([f"# HELP {prefix}_{base} {help_}", f"# TYPE {prefix}_{base} {kind}"])

    for kind, table in (("gauge", gauges), ("counter", counters)):
        for name, (help_, v) in table.items():
            head(name, kind, help_)
            lines.append(f"{prefix}_{name} {v}")
    with m.lock:
        for name, h, help_ in (("time_to_first_token_seconds", m.ttft, "time from arrival to the first token"),
                               ("time_per_output_token_seconds", m.tpot, "mean time between a request's tokens "
                                                                        "after the first"),
                               ("request_latency_seconds", m.e2e, "time from arrival to the last token")):
            head(name, "histogram", help_)
            lines.extend(f"{prefix}_{line}" for line in h.lines(name))
    return "\n".join(lines) + "\n"


__all__ = ["Histogram", "Rate", "EngineMetrics", "render"]
