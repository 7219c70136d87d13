"""Memory planning: offsets of every intermediate buffer in one arena.

A TEMP buffer lives from the call that writes it to the last call that reads it (or reads
a reshaped alias of it). Program outputs, inputs and weights live outside the arena.
Sizes are the upper bounds of the symbolic shapes. A single-output elementwise kernel may
write its output over an input that dies at that call (in place); such pairs share a slot.
Slots are then placed by greedy best-fit over the interval graph, trying a few orders
(by size, by lifetime, by size x lifetime, by start) and keeping the smallest arena.
The lower bound is the largest total size of slots live at one call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..compiler.ops import ELEMENTWISE, Op
from ..compiler.program import Buffer, Program, Role
from ..compiler.symbolic import upper_bound

ALIGN = 64


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass
class _Slot:
    id: int
    size: int
    start: int
    end: int
    offset: int = -1


def buffer_bytes(b: Buffer, symbols) -> int:
    n = 1
    for d in b.shape:
        n *= max(upper_bound(d, symbols), 0)
    return n * b.dtype.itemsize


def _root(buffers: tuple[Buffer, ...], bid: int) -> int:
    while buffers[bid].role is Role.ALIAS:
        bid = buffers[bid].alias_of
    return bid


def live_intervals(program: Program) -> dict[int, tuple[int, int]]:
    """[first call, last call] of every arena buffer (TEMPs that are not program outputs)."""
    bufs = program.buffers
    outside = {_root(bufs, o) for o in program.outputs}
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    for i, call in enumerate(program.calls):
        k = program.kernels[call.kernel]
        n_in = len(k.params)
        for b in call.args[n_in:]:
            r = _root(bufs, b)
            if bufs[r].role is Role.TEMP and r not in outside:
                start.setdefault(r, i)
                end[r] = max(end.get(r, i), i)
        for b in call.args[:n_in]:
            r = _root(bufs, b)
            if r in start:
                end[r] = max(end[r], i)
    return {b: (start[b], end[b]) for b in start}


def _in_place_pairs(program: Program, live: dict[int, tuple[int, int]], sizes: dict[int, int]) -> list[tuple[int, int]]:
    """(input buffer, output buffer) pairs where an elementwise kernel may write over its input."""
    bufs = program.buffers
    pairs = []
    taken: set[int] = set()
    for i, call in enumerate(program.calls):
        k = program.kernels[call.kernel]
        if len(k.outputs) != 1 or any(n.op not in ELEMENTWISE and n.op is not Op.CONST for n in k.body):
            continue
        out = call.args[len(k.params)]
        if out not in live:
            continue
        roots = [_root(bufs, b) for b in call.args[: len(k.params)]]
        for p, r in zip(k.params, roots):
            # read once, at the index it is written (a second view of it could be read elsewhere)
            if (r in live and r not in taken and live[r][1] == i and sizes[r] == sizes[out] and roots.count(r) == 1
                    and tuple(p.shape) == tuple(k.outputs[0].shape) and p.dtype.itemsize == k.outputs[0].dtype.itemsize):
                pairs.append((r, out))
                taken.add(r)
                break
    return pairs


def _place(slots: list[_Slot], order) -> int:
    placed: list[_Slot] = []
    peak = 0
    for s in sorted(slots, key=order):
        busy = sorted((p.offset, p.offset + p.size) for p in placed if p.start <= s.end and s.start <= p.end)
        best, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= s.size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, hi)
        s.offset = cursor if best is None else best
        placed.append(s)
        peak = max(peak, s.offset + s.size)
    return peak


ORDERS = {
    "size": lambda s: (-s.size, -(s.end - s.start), s.start),
    "lifetime": lambda s: (-(s.end - s.start), -s.size, s.start),
    "area": lambda s: (-s.size * (s.end - s.start + 1), s.start),
    "start": lambda s: (s.start, -s.size),
}


def lower_bound(slots: list[_Slot], n_calls: int) -> int:
    load = [0] * (n_calls + 1)
    for s in slots:
        load[s.start] += s.size
        load[s.end + 1] -= s.size
    best = run = 0
    for v in load:
        run += v
        best = max(best, run)
    return best


def plan_memory(program: Program, in_place: bool = True) -> Program:
    symbols = program.graph.symbols
    live = live_intervals(program)
    sizes = {b: _align(buffer_bytes(program.buffers[b], symbols)) for b in live}
    pairs = _in_place_pairs(program, live, sizes) if in_place else []
    slot_of = {b: b for b in live}
    for src, dst in pairs:  # dst continues src's slot
        slot_of[dst] = slot_of[src]
    slots: dict[int, _Slot] = {}
    for b, (s, e) in live.items():
        sid = slot_of[b]
        if sid in slots:
            sl = slots[sid]
            sl.start, sl.end, sl.size = min(sl.start, s), max(sl.end, e), max(sl.size, sizes[b])
        else:
            slots[sid] = _Slot(sid, sizes[b], s, e)
    slot_list = list(slots.values())
    n_calls = len(program.calls)
    best_name, best_peak, best_offsets = "none", 0, {}
    for name, order in ORDERS.items():
        peak = _place(slot_list, order)
        if best_offsets == {} or peak < best_peak:
            best_name, best_peak, best_offsets = name, peak, {s.id: s.offset for s in slot_list}
    buffers = list(program.buffers)
    for b in live:
        buffers[b] = replace(buffers[b], offset=best_offsets[slot_of[b]])
    for b in range(len(buffers)):
        r = _root(program.buffers, b)
        if buffers[b].role is Role.ALIAS and r in live:
            buffers[b] = replace(buffers[b], offset=best_offsets[slot_of[r]])
    plain = [_Slot(b, sizes[b], s, e) for b, (s, e) in live.items()]
    stats = {
        "planned_bytes": best_peak,
        "naive_bytes": sum(sizes.values()),
        "lower_bound_bytes": lower_bound(slot_list, n_calls),
        "lower_bound_no_inplace_bytes": lower_bound(plain, n_calls),
        "buffers": len(live),
        "in_place": len(pairs),
        "in_place_pairs": pairs,
        "heuristic": best_name,
    }
    return program.with_buffers(buffers, best_peak, memory_plan=stats)


def verify_plan(program: Program) -> None:
    """Exhaustive check: buffers whose lifetimes intersect never share bytes (except an
    in-place pair, which shares exactly the same slot)."""
    live = live_intervals(program)
    sizes = {b: _align(buffer_bytes(program.buffers[b], program.graph.symbols)) for b in live}
    pairs = {frozenset(p) for p in program.notes.get("memory_plan", {}).get("in_place_pairs", [])}
    items = sorted(live.items())
    for x, (s1, e1) in items:
        ox = program.buffers[x].offset
        if ox is None or ox % ALIGN or ox + sizes[x] > program.arena_bytes:
            raise AssertionError(f"buffer {x}: offset {ox} size {sizes[x]} outside arena {program.arena_bytes}")
    for i, (x, (s1, e1)) in enumerate(items):
        ox = program.buffers[x].offset
        for y, (s2, e2) in items[i + 1:]:
            oy = program.buffers[y].offset
            if s1 <= e2 and s2 <= e1 and ox < oy + sizes[y] and oy < ox + sizes[x]:
                if frozenset((x, y)) in pairs and ox == oy and (e1 == s2 or e2 == s1):
                    continue
                raise AssertionError(f"buffers {x} [{s1},{e1}] @{ox}+{sizes[x]} and {y} [{s2},{e2}] "
                                     f"@{oy}+{sizes[y]} overlap while both live")
