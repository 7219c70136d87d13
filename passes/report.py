"""What each pass changed, and the text the CLI prints for `--report`."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..compiler.ir import Graph, Node
from ..compiler.ops import Op, SOURCES


@dataclass
class PassReport:
    name: str
    counts: dict[str, int] = field(default_factory=dict)  # machine-readable, e.g. {"attention_fused": 2}
    lines: list[str] = field(default_factory=list)  # human-readable, e.g. "attention: 2 fused, 0 left"
    seconds: float = 0.0

    def __str__(self) -> str:
        body = "; ".join(self.lines) if self.lines else "no change"
        return f"{self.name}: {body}"


# Ops that, left in a graph after fusion, usually mean a pattern was not recognised
# (tanh and sigmoid are left out: BERT's pooler and gates use them on their own).
SUSPECT = (Op.SOFTMAX, Op.ERF, Op.SQRT, Op.RSQRT, Op.EXP, Op.POW, Op.MEAN, Op.SUM, Op.MAX, Op.RECIPROCAL)

_LAYER = re.compile(r"(?:^|[._/])(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)[._/](\d+)(?:[._/]|$)")


def layer_of_name(name: str) -> int | None:
    """Transformer layer index named in a module path or weight name (`model.layers.3.mlp`)."""
    m = _LAYER.search(name or "")
    return int(m.group(1)) if m else None


def layer_of_group(nodes: Sequence[Node]) -> int | None:
    """The layer a kernel belongs to: its anchor op's provenance if it has one (weights may be
    shared or deduplicated across layers), else the most common layer among its nodes'
    provenance, else among the weights it reads."""
    from .partition import HEAVY

    anchors = [n for n in nodes if n.op in HEAVY and n.where]
    if anchors:
        return layer_of_name(anchors[-1].where)
    for names in ([n.where for n in nodes], [i.attrs.name for n in nodes for i in n.inputs if i.op is Op.WEIGHT]):
        votes = Counter(k for k in map(layer_of_name, names) if k is not None)
        if votes:
            return votes.most_common(1)[0][0]
    return None


def op_counts(graph: Graph) -> Counter:
    return Counter(n.op for n in graph.nodes() if n.op not in SOURCES)


def unfused_counts(graph: Graph) -> dict[str, int]:
    c = op_counts(graph)
    return {op.name.lower(): c[op] for op in SUSPECT if c[op]}


def group_layers(groups: Sequence[Sequence[Node]]) -> list[int | None]:
    """Layer of each kernel. A kernel read by several layers (rotary tables, the attention
    mask) is shared model-level work, whatever its nodes' provenance says."""
    layers = [layer_of_group(g) for g in groups]
    owner = {n.uid: gi for gi, g in enumerate(groups) for n in g}
    readers: dict[int, set] = {}
    for gi, g in enumerate(groups):
        for n in g:
            for i in n.inputs:
                src = i
                while src.uid not in owner and src.op is Op.RESHAPE:
                    src = src.inputs[0]
                if src.uid in owner and owner[src.uid] != gi:
                    readers.setdefault(owner[src.uid], set()).add(layers[gi])
    return [None if len(readers.get(gi, ())) > 1 else k for gi, k in enumerate(layers)]


def kernels_per_layer(groups: Sequence[Sequence[Node]]) -> dict[int | None, int]:
    return dict(Counter(group_layers(groups)))


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**16 else f"{b} B"


def format_memory(plan: Mapping) -> str:
    lb = plan["lower_bound_bytes"] or 1
    return (f"memory: planned {_mib(plan['planned_bytes'])}, lower bound {_mib(plan['lower_bound_bytes'])} "
            f"({plan['planned_bytes'] / lb:.2f}x), naive sum {_mib(plan['naive_bytes'])}, "
            f"{plan['buffers']} buffers, {plan['in_place']} in place")


# Ops a pass may create by fusion that a frontend may also emit directly (torch's
# F.layer_norm / F.scaled_dot_product_attention, ONNX's LayerNormalization, ...).
FUSED_OPS = (Op.RMS_NORM, Op.LAYER_NORM, Op.ATTENTION, Op.GELU, Op.SILU)

_FUSED_LINE = re.compile(r"^(\w+): (\d+) fused\b")


def fused_origins(source: Graph, graph: Graph) -> dict[Op, tuple[int, int]]:
    """{op: (count the frontend emitted, count the passes added)} for the fused op kinds
    present in the optimised graph (or the source)."""
    before, after = op_counts(source), op_counts(graph)
    return {op: (before[op], max(after[op] - before[op], 0)) for op in FUSED_OPS if before[op] or after[op]}


def _with_origin(line: str, origins: Mapping[str, tuple[int, int]]) -> str:
    """'rms_norm: 0 fused' -> 'rms_norm: 0 fused by passes (13 from the frontend)'."""
    m = _FUSED_LINE.match(line)
    if not m or m.group(1) not in origins:
        return line
    return (line[:m.end()] + " by passes" + line[m.end():]
            + f" ({origins[m.group(1)][0]} from the frontend)")


def format_report(reports: Sequence[PassReport], graph: Graph | None = None, program=None,
                  source: Graph | None = None) -> str:
    """Per-pass changes, then where each fused op came from (with `source`, the graph the
    frontend produced), what is left unfused, kernels per layer and the memory plan."""
    origins = fused_origins(source, graph) if source is not None and graph is not None else {}
    by_name = {op.name.lower(): v for op, v in origins.items()}
    lines = ["passes:"]
    for r in reports:
        body = "; ".join(_with_origin(x, by_name) for x in r.lines) if r.lines else "no change"
        lines.append(f"  {r.name:<20} {body}  ({r.seconds * 1000:.0f} ms)")
    if origins:
        lines.append("fused ops: " + ", ".join(f"{op.name.lower()} {a + b} ({a} from the frontend, {b} fused by passes)"
                                             for op, (a, b) in origins.items()))
    if graph is not None:
        c = op_counts(graph)
        lines.append("ops after fusion: " + ", ".join(f"{op.name.lower()} {k}" for op, k in c.most_common()))
        left = unfused_counts(graph)
        lines.append("unfused ops by kind: " + (", ".join(f"{k} {v}" for k, v in left.items()) or "none"))
    if program is not None:
        notes = program.notes
        per_layer = notes.get("kernels_per_layer")
        lines.append(f"kernels: {len(program.kernels)} distinct, {len(program.calls)} calls")
        if per_layer:
            layers = sorted(k for k in per_layer if k is not None)
            if layers:
                counts = [per_layer[k] for k in layers]
                lines.append(f"  per transformer layer: {min(counts)}..{max(counts)} over {len(layers)} layers"
                             if min(counts) != max(counts) else
                             f"  per transformer layer: {counts[0]} (x{len(layers)} layers)")
            if None in per_layer:
                lines.append(f"  outside layers: {per_layer[None]}")
        if "memory_plan" in notes:
            lines.append(format_memory(notes["memory_plan"]))
    return "\n".join(lines)
