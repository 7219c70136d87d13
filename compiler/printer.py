"""A readable text form of a Graph, one SSA line per node:

    %7: f32[batch, seq, 64] = matmul(%5, %6)    # model.layers.0.mlp.up_proj
"""
from __future__ import annotations

import dataclasses

from .ir import Graph, Node
from .ops import NoAttrs, Op


def _attr_str(attrs) -> str:
    if isinstance(attrs, NoAttrs):
        return ""
    parts = []
    for f in dataclasses.fields(attrs):
        v = getattr(attrs, f.name)
        if hasattr(v, "value") and hasattr(v, "name") and not isinstance(v, (int, float, str)):
            v = v.value  # enums print as their value
        elif isinstance(v, tuple):
            v = "(" + ", ".join(str(x) for x in v) + ")"
        parts.append(f"{f.name}={v}")
    return "{" + ", ".join(parts) + "}"


def format_graph(graph: Graph, show_where: bool = True) -> str:
    names: dict[int, str] = {}
    lines = ["graph(" + ", ".join(f"%{n.attrs.name}: {n.type}" for n in graph.inputs) + ")"]
    syms = ", ".join(f"{s.name} in [{s.lo}, {s.hi}]" for s in graph.symbols.values())
    if syms:
        lines.append(f"  symbols: {syms}")
    for n in graph.inputs:
        names[n.uid] = f"%{n.attrs.name}"
    k = 0
    for n in graph.nodes():
        if n.op is Op.INPUT:
            continue
        if n.op is Op.WEIGHT:
            names[n.uid] = f"@{n.attrs.name}"
            continue
        names[n.uid] = f"%{k}"
        k += 1
        args = ", ".join(names[i.uid] for i in n.inputs)
        line = f"  {names[n.uid]}: {n.type} = {n.op.name.lower()}{_attr_str(n.attrs)}({args})"
        if show_where and n.where:
            line = f"{line:<72}  # {n.where}"
        lines.append(line)
    outs = ", ".join(names[o.uid] for o in graph.outputs)
    lines.append(f"  return {outs}")
    return "\n".join(lines)


def format_node(n: Node) -> str:
    return f"{n.op.name.lower()}{_attr_str(n.attrs)} -> {n.type}"
