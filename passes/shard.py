"""shard: one graph -> the program every rank of a tensor-parallel group runs, and each rank's weights.

From the graph alone (no per-model annotations) the pass gives every value a layout, replicated,
split along an axis, or a partial sum (passes/shard_layout.py), walking the graph in order with
one rule per op (passes/shard_rules.py). The result for a transformer is Megatron's cut:
attention split by heads (q/k/v column-parallel, their KV cache pages holding the rank's kv heads,
the output projection row-parallel), the MLP split by its hidden features (gate/up column-parallel,
down row-parallel), the embedding table and the LM head split by vocabulary, and collectives
where a replicated value is needed: an ALL_REDUCE of each partial sum before the residual add,
an ALL_GATHER of the logits at the output. An op with no rule for the layouts it meets runs
replicated on gathered inputs, so the pass never changes what the graph computes, only where.

The rank programs are one graph (rank-local shapes, the same kernels), and differ only in their
weights: `ShardedGraph.rank_params[r]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compiler import ir
from ..compiler.ir import Graph
from ..compiler.ops import Op, SOURCES
from ..errors import LLMCError
from .report import PassReport
from .rewrite import substitute
from .shard_layout import Sharder, WeightShard
from .shard_rules import RULES


@dataclass(frozen=True)
class ShardedGraph:
    graph: Graph  # every rank's program; its params are rank 0's
    rank_params: tuple[dict, ...]  # weight name -> this rank's array
    world: int

    def rank_graph(self, rank: int) -> Graph:
        g = self.graph
        return Graph(g.inputs, g.outputs, self.rank_params[rank], g.symbols, g.output_names)

    def weight_bytes(self, rank: int = 0) -> int:
        return sum(int(np.asarray(a).nbytes) for a in self.rank_params[rank].values())


def shard(graph: Graph, world: int, memo: dict | None = None) -> tuple[ShardedGraph, PassReport]:
    """`memo`: a dict shared by shard runs over the same weights, so each rank's part of a weight
    is cut (and held) once."""
    if not isinstance(world, int) or world < 1:
        raise LLMCError(f"tensor parallelism: the group size must be a positive int, got {world!r}")
    if world == 1:
        return ShardedGraph(graph, (dict(graph.params),), 1), PassReport("shard", {}, ["tp 1: unchanged"])
    if any(n.op in (Op.ALL_REDUCE, Op.ALL_GATHER) for n in graph.nodes()):
        raise LLMCError("shard: the graph is already sharded (it has collectives)")
    sh = Sharder(world, graph.params, graph.users(), memo={} if memo is None else memo)
    for n in graph.nodes():
        if n.op in SOURCES:
            sh.local[n.uid] = (n, None)
            continue
        rule = RULES.get(n.op)
        out = rule(sh, n) if rule is not None else None
        if out is None:
            ins = [sh.replicated(i, f"{n.op.name.lower()} at {n.where or '<graph>'}") for i in n.inputs]
            same = all(a is b for a, b in zip(ins, n.inputs))
            out = (n if same else ir.node(n.op, ins, n.attrs, n.where), None)
        sh.local[n.uid] = out
    outputs = tuple(sh.replicated(o, "the graph output") for o in graph.outputs)
    inputs = tuple(sh.inputs.get(i.uid, i) for i in graph.inputs)
    bare = _whole_copies_renamed(Graph(inputs, outputs, {}, graph.symbols, graph.output_names), sh)
    names = {n.attrs.name for n in bare.nodes() if n.op is Op.WEIGHT}
    inputs, outputs = bare.inputs, bare.outputs
    rank_params = tuple(sh.rank_params(names))
    result = ShardedGraph(Graph(inputs, outputs, rank_params[0], graph.symbols, graph.output_names), rank_params, world)
    whole = sum(int(np.asarray(a).nbytes) for a in graph.params.values())
    c = sh.counts
    lines = [f"tp {world}: {c.get('column_parallel', 0)} column-parallel and {c.get('row_parallel', 0)} row-parallel "
             f"matmuls, attention split by heads in {c.get('attention_by_heads', 0)} layers, "
             f"{c.get('vocab_parallel_embedding', 0)} embedding tables split by vocabulary",
             f"{c.get('all_reduce', 0)} all-reduce, {c.get('all_gather', 0)} all-gather; "
             f"weights per rank {result.weight_bytes() / max(whole, 1):.2f}x of the whole"]
    if sh.gathered_at:
        shown = sh.gathered_at[:4]
        lines.append("gathered for: " + ", ".join(shown) + (f" (+{len(sh.gathered_at) - 4} more)" if len(sh.gathered_at) > 4 else ""))
    return result, PassReport("shard", dict(c), lines)


def _whole_copies_renamed(g: Graph, sh: Sharder) -> Graph:
    """A weight read both whole and split (a tied table, say) keeps its name for the split; the
    whole reads get `name#whole`, so each name in a rank's weights is one array."""
    split_nodes = {w.uid for w in sh.split_weight_nodes()}
    mapping = {}
    for n in g.nodes():
        if n.op is Op.WEIGHT and n.uid not in split_nodes and n.attrs.name in sh.weights:
            whole = f"{n.attrs.name}#whole"
            sh.weights[whole] = WeightShard(n.attrs.name, None)
            mapping[n.uid] = ir.weight_node(whole, n.type)
    return substitute(g, mapping, {}) if mapping else g


__all__ = ["shard", "ShardedGraph"]
