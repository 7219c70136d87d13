"""The pass pipeline: a plain list of `Graph -> (Graph, PassReport)` functions.

`run_pipeline` runs them in order; with `verify_each` the verifier checks the graph after
every pass, and with `dump_dir` the printed IR after each pass is written there
(`00_input.txt`, `01_simplify.txt`, ...). `build_program` then groups the nodes into
kernels, lowers to a Program and plans its memory, and reports on each step.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from ..compiler.ir import Graph
from ..compiler.program import Program, lower_to_program
from ..compiler.verifier import VerifyError, verify
from .fuse_activations import fuse_activations
from .fuse_attention import fuse_attention
from .fuse_moe import fuse_moe
from .fuse_norms import fuse_norms
from .index_bounds import bound_symbols_by_tables
from .merge_projections import merge_projections
from .partition import fused_grouping, grouping_stats
from .plan_memory import plan_memory
from .simplify import simplify
from .report import PassReport, format_memory, format_report, op_counts, unfused_counts

Pass = Callable[[Graph], "tuple[Graph, PassReport]"]

# bound_symbols_by_tables runs first, on the graph as captured (its arange/slice index chains
# are plainest there); simplify runs again at the end to fold what fusion exposed (e.g.
# permutes of merged weights)
DEFAULT_PIPELINE: list[Pass] = [bound_symbols_by_tables, simplify, fuse_norms, fuse_activations, fuse_attention,
                                fuse_moe, merge_projections, simplify]


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", type(p).__name__)


def run_pipeline(graph: Graph, passes: Sequence[Pass] = DEFAULT_PIPELINE, verify_each: bool = False,
                 dump_dir: str | os.PathLike | None = None) -> tuple[Graph, list[PassReport]]:
    reports: list[PassReport] = []
    if dump_dir is not None:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, "00_input.txt"), "w") as f:
            f.write(str(graph) + "\n")
    if verify_each:
        _verify(graph, "input")
    for i, p in enumerate(passes, 1):
        name = pass_name(p)
        t0 = time.perf_counter()
        out = p(graph)
        graph, report = out if isinstance(out, tuple) else (out, PassReport(name))
        report.seconds = time.perf_counter() - t0
        if report.name != name:
            report.name = name
        reports.append(report)
        if verify_each:
            _verify(graph, name)
        if dump_dir is not None:
            with open(os.path.join(dump_dir, f"{i:02d}_{name}.txt"), "w") as f:
                f.write(str(graph) + "\n")
    return graph, reports


def _verify(graph: Graph, after: str) -> None:
    try:
        verify(graph)
    except VerifyError as e:
        raise VerifyError(f"after pass {after}: {e}") from e


def build_program(graph: Graph, passes: Sequence[Pass] = DEFAULT_PIPELINE, verify_each: bool = False,
                  dump_dir: str | os.PathLike | None = None, plan: bool = True, grouping=fused_grouping,
                  prepare=None, grouping_name: str = "fused_grouping") -> tuple[Program, list[PassReport]]:
    """Optimise a graph, group it into fused kernels, lower it and plan its memory.

    A backend may bring its own `grouping`, and a `prepare(graph) -> (graph, note)` step
    run between the passes and the grouping (CUDA does both for its library routes)."""
    graph, reports = run_pipeline(graph, passes, verify_each, dump_dir)
    t0 = time.perf_counter()
    note = ""
    if prepare is not None:
        graph, note = prepare(graph)
    groups = grouping(graph)
    stats = grouping_stats(groups)
    program = lower_to_program(graph, lambda g: groups)
    per_layer = stats["kernels_per_layer"]
    layers = sorted(k for k in per_layer if k is not None)
    lines = [f"{stats['kernels']} kernel calls" + (f" ({note})" if note else "")]
    if layers:
        lines.append(f"per layer: {', '.join(str(per_layer[k]) for k in layers)}")
    lines.append(", ".join(f"{k} {v}" for k, v in sorted(stats["by_anchor"].items())))
    reports.append(PassReport(grouping_name, {"kernels": stats["kernels"]}, lines, time.perf_counter() - t0))
    program = program.with_buffers(program.buffers, program.arena_bytes, kernels_per_layer=per_layer,
                                   unfused=unfused_counts(graph), op_counts={o.name.lower(): c for o, c in op_counts(graph).items()})
    if plan:
        t0 = time.perf_counter()
        program = plan_memory(program)
        mp = program.notes["memory_plan"]
        reports.append(PassReport("plan_memory", {k: v for k, v in mp.items() if isinstance(v, int)},
                                  [format_memory(mp).removeprefix("memory: ")], time.perf_counter() - t0))
    return program, reports


__all__ = ["DEFAULT_PIPELINE", "run_pipeline", "build_program", "format_report", "fused_grouping", "plan_memory",
           "PassReport"]
