"""Scheduling policies on real Seq objects: skip-join entry, demotion, aging, who may preempt."""
from __future__ import annotations

import numpy as np

from llmc.runtime.engine.sampler import SamplingParams
from llmc.runtime.serve.policy import Fcfs, SkipJoinMlfq
from llmc.runtime.serve.sequence import Request, Seq


def seq(prompt_len: int, order: int) -> Seq:
    r = Request(f"r{order}", list(range(prompt_len)), SamplingParams(), lambda ev: None, 0.0)
    return Seq(r, 0, list(r.prompt), np.random.default_rng(0), order, None)


def test_skip_join_puts_a_long_prompt_in_a_lower_queue():
    m = SkipJoinMlfq(levels=4, base_quantum=8, prefill_ratio=8)
    short, mid, huge = seq(10, 0), seq(100, 1), seq(10_000, 2)
    for s in (short, mid, huge):
        m.admit(s)
    assert (short.level, mid.level, huge.level) == (0, 1, 3)  # 100 / 8 = 12.5 > 8, <= 16
    assert m.key(short) < m.key(mid) < m.key(huge)


def test_a_job_is_demoted_when_its_quantum_is_used_and_ages_back_up():
    m = SkipJoinMlfq(levels=3, base_quantum=4, prefill_ratio=8, starve_steps=10)
    s = seq(8, 0)
    m.admit(s)
    for step in range(1, 4):
        m.served(s, 0, 1, step)
    assert s.level == 0
    m.served(s, 0, 1, 4)
    assert s.level == 1 and s.level_service == 0
    m.age([s], 4 + 10)
    assert s.level == 1
    m.age([s], 4 + 11)
    assert s.level == 0


def test_only_a_higher_queue_preempts_for_pages():
    m = SkipJoinMlfq()
    a, b = seq(4, 0), seq(4, 1)
    m.admit(a)
    m.admit(b)
    b.level = 2
    assert m.outranks(a, b) and not m.outranks(b, a)
    a.level = 2
    assert not m.outranks(a, b)  # same queue: FCFS inside it, no displacement
    assert not Fcfs().outranks(a, b)
