"""stage_split: one graph -> the programs of a pipeline's stages, joined by SEND / RECV.

The transformer layers (read off each node's provenance, as the reports count kernels per layer)
are cut into `stages` contiguous runs of near-equal size. Stage s computes its layers; the work
before the first layer (the embedding) joins stage 0 and the work after the last (final norm,
LM head) the last stage. Values computed from the step's inputs and weights alone (rotary
tables, masks, the embedding lookup) are computed by each stage that reads them, not sent. An
activation made in stage s and read in stage t > s is SENT from s and RECEIVED by s+1, which
forwards it on until t: for a transformer, the residual stream at each cut (a sharded program
also sends the partial sum that the next stage's all-reduce completes: several activations at a
cut travel stacked in one message).

Every stage takes the graph's inputs that it reads (the KV caches of its own layers among them);
stage s < last returns its SENDs (so they stay live), the last stage the graph's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler import ir
from ..compiler.ir import Graph, Node
from ..compiler.ops import AxisAttrs, Op, RecvAttrs, SendAttrs, ShapeAttrs, SliceAttrs, SOURCES
from ..errors import LLMCError
from .partition import HEAVY
from .report import PassReport, layer_of_name
from .rewrite import substitute


@dataclass(frozen=True)
class StagedGraph:
    stages: tuple[Graph, ...]
    layers: tuple[tuple[int, int], ...]  # [first, last] layer of each stage
    sends: int  # activations sent per step (at all cuts)


def _layer(n: Node) -> int | None:
    if n.op is Op.PAGED_ATTENTION:
        return n.attrs.layer
    k = layer_of_name(n.where)
    if k is None:
        k = next((layer_of_name(i.attrs.name) for i in n.inputs if i.op is Op.WEIGHT and layer_of_name(i.attrs.name)
                  is not None), None)
    return k


def stage_split(graph: Graph, stages: int) -> tuple[StagedGraph, PassReport]:
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise LLMCError(f"pipeline parallelism: the stage count must be a positive int, got {stages!r}")
    nodes = graph.nodes()
    layers = sorted({k for n in nodes if n.op not in SOURCES and (k := _layer(n)) is not None})
    if stages == 1:
        return StagedGraph((graph,), ((layers[0], layers[-1]) if layers else (0, 0),), 0), PassReport("stage_split")
    if len(layers) < stages:
        raise LLMCError(f"pipeline parallelism: {stages} stages need at least {stages} layers; the graph has "
                        f"{len(layers)} ({'none found' if not layers else layers})")
    index = {k: i for i, k in enumerate(layers)}
    stage_of_layer = {k: index[k] * stages // len(layers) for k in layers}

    # free: computed from inputs and weights alone, before any layer; recomputed where read
    free: set[int] = set()
    stage: dict[int, int] = {}
    for n in nodes:
        if n.op in SOURCES:
            free.add(n.uid)
            continue
        deps = [stage[i.uid] for i in n.inputs if i.uid not in free]
        if not deps and n.op not in HEAVY and not any(i.op is Op.WEIGHT and layer_of_name(i.attrs.name) is not None
                                                      for i in n.inputs):
            free.add(n.uid)  # light work on inputs alone, whatever layer wrote it (rotary tables: layer 0's attention)
            continue
        k = _layer(n)
        if k is None and not deps:  # heavy input-only work outside the layers (the first norm): stage 0
            k = layers[0]
        s = stage_of_layer[k] if k is not None else max(deps)
        stage[n.uid] = max([s, *deps])  # never before what it reads
    for o in graph.outputs:
        if o.uid in free or stage[o.uid] != stages - 1:
            raise LLMCError("pipeline parallelism: the graph's outputs must come from its last layers")

    # per stage: rebuild the nodes it computes; values from earlier stages arrive by RECV
    built: list[dict[int, Node]] = [{} for _ in range(stages)]
    sends: list[list[Node]] = [[] for _ in range(stages)]
    tags: dict[int, int] = {}

    def value(n: Node, s: int) -> Node:
        """n as stage s sees it."""
        got = built[s].get(n.uid)
        if got is not None:
            return got
        if n.uid in free:
            out = n if n.op in SOURCES else ir.node(n.op, [value(i, s) for i in n.inputs], n.attrs, n.where)
        elif stage[n.uid] == s:
            out = ir.node(n.op, [value(i, s) for i in n.inputs], n.attrs, n.where)
        else:  # made upstream: the previous stage sends it on (forwarding what it received itself)
            prev = value(n, s - 1)
            tag = tags.setdefault(n.uid, len(tags))
            sends[s - 1].append(ir.node(Op.SEND, [prev], SendAttrs(tag, s), n.where))
            out = ir.node(Op.RECV, [], RecvAttrs(tag, s - 1, tuple(n.shape), n.dtype), n.where)
        built[s][n.uid] = out
        return out

    for n in nodes:  # in order, so every stage's SENDs go out in one deterministic order
        if n.op in SOURCES or n.uid in free:
            continue
        value(n, stage[n.uid])
    for o in graph.outputs:
        value(o, stages - 1)

    graphs = []
    for s in range(stages):
        outs = tuple(built[s][o.uid] for o in graph.outputs) if s == stages - 1 else tuple(sends[s])
        reach = Graph((), outs, {}, graph.symbols).nodes()  # reachable from this stage's outputs
        used = {n.uid for n in reach}
        # and inputs that bind the symbols its shapes use (a stage that receives the hidden state
        # still learns the token count from an input: tokens, positions)
        wanted = {sym for n in reach for d in n.shape for sym in _symbols(d)}
        bound = {sym for i in graph.inputs if i.uid in used for d in i.shape for sym in _symbols(d)}
        for i in graph.inputs:
            extra = {sym for d in i.shape for sym in _symbols(d)} & (wanted - bound)
            if extra:
                used.add(i.uid)
                bound |= extra
        inputs = tuple(i for i in graph.inputs if i.uid in used)
        names = graph.output_names if s == stages - 1 else ()
        graphs.append(Graph(inputs, outs, {}, graph.symbols, names).with_outputs(outs, graph.params))
    graphs = _one_message_per_cut(graphs, graph.params)
    spans = []
    for s in range(stages):
        mine = [k for k in layers if stage_of_layer[k] == s]
        spans.append((mine[0], mine[-1]))
    n_sends = sum(len(x) for x in sends)
    lines = [f"{stages} stages: layers " + ", ".join(f"{a}-{b}" for a, b in spans) + f"; {n_sends} activations sent "
             f"per step ({', '.join(str(len(x)) for x in sends[:-1])} at the cuts, one message per cut)"]
    return StagedGraph(tuple(graphs), tuple(spans), n_sends), PassReport("stage_split", {"sends": n_sends}, lines)


def _one_message_per_cut(graphs: list[Graph], params) -> list[Graph]:
    """Where several activations cross one cut (a sharded program sends the all-reduced residual
    and a partial sum the next stage's all-reduce completes), stack them into one SEND and slice
    them out of one RECV. The runtime pairs a stage's sends with the next stage's receives in
    call order (NCCL has no tags), and the compiled programs need not issue them in tag order:
    with one message per cut the order cannot disagree."""
    out = list(graphs)
    for s in range(len(out) - 1):
        src, dst = out[s], out[s + 1]
        sends = list(src.outputs)
        if len(sends) < 2:
            continue
        xs = [n.inputs[0] for n in sends]
        if len({(tuple(x.shape), x.dtype) for x in xs}) != 1:
            raise LLMCError(f"pipeline parallelism: {len(xs)} activations of different shapes or dtypes cross the cut "
                            f"after stage {s} ({', '.join(f'{x.dtype.value}{tuple(x.shape)}' for x in xs)}); one "
                            f"message per cut is built for activations of one shape")
        shape, dtype = tuple(xs[0].shape), xs[0].dtype
        where = sends[0].where
        stacked = ir.node(Op.CONCAT, [ir.node(Op.RESHAPE, [x], ShapeAttrs((1, *shape)), where) for x in xs],
                          AxisAttrs(0), where)
        send = ir.node(Op.SEND, [stacked], SendAttrs(sends[0].attrs.tag, s + 1), where)
        out[s] = Graph(src.inputs, (send,), {}, src.symbols, src.output_names).with_outputs((send,), params)
        index = {n.attrs.tag: i for i, n in enumerate(sends)}
        recv = ir.node(Op.RECV, [], RecvAttrs(sends[0].attrs.tag, s, (len(xs), *shape), dtype), where)
        mapping = {}
        for n in dst.nodes():
            if n.op is Op.RECV and n.attrs.peer == s:
                i = index[n.attrs.tag]
                part = ir.node(Op.SLICE, [recv], SliceAttrs(0, i, i + 1), n.where)
                mapping[n.uid] = ir.node(Op.RESHAPE, [part], ShapeAttrs(shape), n.where)
        out[s + 1] = substitute(dst, mapping, dst.params)
    return out


def _symbols(d) -> frozenset:
    return frozenset() if isinstance(d, int) else d.symbols


__all__ = ["stage_split", "StagedGraph"]
