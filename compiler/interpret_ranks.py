"""Run the rank graphs of a parallel program together on numpy arrays (the oracle for the shard and
stage_split passes).

Each rank interprets its own graph; the ranks meet at collectives (ALL_REDUCE, ALL_GATHER: every
rank of the group brings its value, each gets the combined one) and at point-to-point ops (a RECV
waits for the SEND of the same tag from its peer). Collectives pair up by order: the k-th collective
of every rank in a group is the same one, as it is for NCCL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np

from ..errors import LLMCError
from .interpreter import bind_symbols
from .ir import Graph
from .ops import Op
from .reference import run_op


@dataclass
class RankRun:
    graph: Graph
    arrays: Sequence[np.ndarray]
    group: tuple[int, ...] = ()  # ranks its collectives span (default: every rank)
    params: dict | None = None  # weights of this rank (default: graph.params)
    pipeline: tuple[int, ...] = ()  # its pipeline group, by stage: SEND/RECV peers index it (default: every rank)


@dataclass
class _Waiting:
    kind: str  # "coll" | "recv"
    key: tuple
    op: Op | None = None
    value: np.ndarray | None = None
    world: int = 0


@dataclass
class _State:
    gen: Generator
    waiting: _Waiting | None = None
    outputs: list | None = None
    collectives: int = 0


def _rank(run: RankRun, rank: int, pipeline: tuple[int, ...]) -> Generator:
    g = run.graph
    arrays = [np.asarray(a) for a in run.arrays]
    env = bind_symbols(g.inputs, arrays, g.symbols)
    params = g.params if run.params is None else run.params
    values = {n.uid: a for n, a in zip(g.inputs, arrays)}
    for n in g.nodes():
        if n.uid in values:
            continue
        if n.op is Op.WEIGHT:
            values[n.uid] = np.asarray(params[n.attrs.name])
        elif n.op in (Op.ALL_REDUCE, Op.ALL_GATHER):
            values[n.uid] = (yield ("coll", n, values[n.inputs[0].uid])).astype(n.dtype.numpy, copy=False)
        elif n.op is Op.SEND:
            x = values[n.inputs[0].uid]
            yield ("send", (rank, pipeline[n.attrs.peer], n.attrs.tag), x)
            values[n.uid] = x
        elif n.op is Op.RECV:
            values[n.uid] = yield ("recv", (pipeline[n.attrs.peer], rank, n.attrs.tag), None)
        else:
            values[n.uid] = run_op(n.op, n.attrs, [values[i.uid] for i in n.inputs], env, n.dtype)
    return [values[o.uid] for o in g.outputs]


def _combine(op: Op, xs: list[np.ndarray]) -> np.ndarray:
    if op is Op.ALL_REDUCE:
        acc = np.zeros(xs[0].shape, np.float64 if xs[0].dtype.kind == "f" else xs[0].dtype)
        for x in xs:
            acc = acc + x
        return acc.astype(xs[0].dtype)
    return np.stack(xs)


def interpret_ranks(runs: Sequence[RankRun]) -> list[list[np.ndarray]]:
    """Each rank's outputs. Raises LLMCError when the ranks deadlock (a RECV no one sends, a
    collective some rank of its group never reaches) or disagree at a collective."""
    groups = [tuple(r.group) or tuple(range(len(runs))) for r in runs]
    mailbox: dict[tuple, np.ndarray] = {}
    states = [_State(_rank(r, i, tuple(r.pipeline) or tuple(range(len(runs))))) for i, r in enumerate(runs)]
    first = [True] * len(runs)

    def step(i: int, value) -> None:
        s = states[i]
        while True:
            try:
                if first[i]:
                    first[i] = False
                    kind, a, b = next(s.gen)
                else:
                    kind, a, b = s.gen.send(value)
            except StopIteration as stop:
                s.outputs, s.waiting = stop.value, None
                return
            value = None
            if kind == "send":
                if a in mailbox:
                    raise LLMCError(f"rank {i}: a second SEND with tag {a[2]} to rank {a[1]} before the first was received")
                mailbox[a] = b
                continue
            if kind == "recv":
                if a in mailbox:
                    value = mailbox.pop(a)
                    continue
                s.waiting = _Waiting("recv", a)
                return
            s.collectives += 1
            s.waiting = _Waiting("coll", (groups[i], s.collectives), a.op, b, a.attrs.world)
            return

    for i in range(len(runs)):
        step(i, None)
    while any(s.outputs is None for s in states):
        progress = False
        for i, s in enumerate(states):
            w = s.waiting
            if s.outputs is not None or w is None:
                continue
            if w.kind == "recv" and w.key in mailbox:
                s.waiting = None
                step(i, mailbox.pop(w.key))
                progress = True
            elif w.kind == "coll":
                members = groups[i]
                ws = [states[j].waiting for j in members]
                if all(x is not None and x.kind == "coll" and x.key == w.key for x in ws):
                    ops = {(x.op, x.world) for x in ws}
                    if len(ops) != 1 or w.world != len(members):
                        raise LLMCError(f"ranks {members} disagree at collective #{w.key[1]}: "
                                        f"{sorted((o.name.lower(), n) for o, n in ops)} over a group of {len(members)}")
                    out = _combine(w.op, [x.value for x in ws])
                    for j in members:
                        states[j].waiting = None
                    for j in members:
                        step(j, out.copy())  # each rank its own array, as each GPU has
                    progress = True
        if not progress:
            stuck = {i: (s.waiting.kind, s.waiting.key) for i, s in enumerate(states) if s.waiting is not None}
            raise LLMCError(f"the ranks deadlock: waiting {stuck}")
    return [s.outputs for s in states]


__all__ = ["RankRun", "interpret_ranks"]
