"""Gathered-expert matmuls -> Op.ROUTED_MATMUL (mixture of experts).

Routed experts captured as "gather each row's expert matrix, then a batched mat-vec"
(transformers' batched_mm experts, and any model written that way):

    MATMUL(INDEX(w [E, N, K], ids [*]), reshape(x [*, K] -> [*, K, 1]))   -> [*, N, 1]
    MATMUL(reshape(x [*, K] -> [*, 1, K]), INDEX(w [E, K, N], ids [*]))   -> [*, 1, N]

become reshape(ROUTED_MATMUL(x, w, ids)). The gathered [*, N, K] copy of the weights (one
expert matrix per token and choice) is never made, and the kernel reads, for each row,
only the expert its id picks. A gathered matmul of any other shape is left as it is and
counted in the report.
"""
from __future__ import annotations

import time

from ..compiler import ir
from ..compiler.ir import Graph, Node
from ..compiler.ops import Op, RoutedMatmulAttrs, ShapeAttrs
from .report import PassReport
from .rewrite import substitute


def _expert_gather(n: Node) -> tuple[Node, Node] | None:
    """(w, ids) if n is w[ids] over the leading axis of a rank-3 tensor."""
    if n.op is not Op.INDEX or len(n.inputs) != 2 or n.inputs[0].type.rank != 3:
        return None
    w, ids = n.inputs
    return w, ids


def _reshape(x: Node, shape, where: str) -> Node:
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        return x
    if x.op is Op.RESHAPE:  # look through the reshape that made the mat-vec operand
        x = x.inputs[0]
        if tuple(x.shape) == shape:
            return x
    return ir.node(Op.RESHAPE, [x], ShapeAttrs(shape), where)


def _routed(mm: Node) -> Node | None:
    a, b = mm.inputs
    for gathered, vec, weight_nk in ((a, b, True), (b, a, False)):
        found = _expert_gather(gathered)
        if found is None:
            continue
        w, ids = found
        lead = tuple(ids.shape)
        if tuple(mm.shape[:-2]) != lead or tuple(vec.shape[:-2]) != lead:
            continue  # a broadcast batch: not one expert per row
        if weight_nk and vec.shape[-1] == 1:  # [*, N, K] @ [*, K, 1]
            k = vec.shape[-2]
        elif not weight_nk and vec.shape[-2] == 1:  # [*, 1, K] @ [*, K, N]
            k = vec.shape[-1]
        else:
            continue
        x = _reshape(vec, lead + (k,), mm.where)
        y = ir.node(Op.ROUTED_MATMUL, [x, w, ids], RoutedMatmulAttrs(weight_nk), mm.where)
        return _reshape(y, mm.shape, mm.where)
    return None


def fuse_moe(graph: Graph) -> tuple[Graph, PassReport]:
    t0 = time.perf_counter()
    mapping: dict[int, Node] = {}
    for n in graph.nodes():
        if n.op is Op.MATMUL:
            r = _routed(n)
            if r is not None:
                mapping[n.uid] = r
    if mapping:
        graph = substitute(graph, mapping)
    left = sum(1 for n in graph.nodes() if n.op is Op.MATMUL and any(_expert_gather(i) for i in n.inputs))
    lines = [f"routed_matmul: {len(mapping)} fused, {left} gathered-expert matmuls left"] if mapping or left else []
    return graph, PassReport("fuse_moe", {"routed_matmul_fused": len(mapping), "gathered_matmul_left": left},
                             lines, time.perf_counter() - t0)
