"""Checks a Graph is well formed: types agree with inference, weights exist, inputs are inputs."""
from __future__ import annotations

from ..errors import LLMCError
from .infer import infer_type
from .ir import Graph
from .ops import Op
from .symbolic import SymExpr


class VerifyError(LLMCError):
    pass


def verify(graph: Graph) -> None:
    input_ids = {n.uid for n in graph.inputs}
    for n in graph.nodes():
        if n.op is Op.INPUT:
            if n.uid not in input_ids:
                raise VerifyError(f"input node {n.attrs.name!r} is not among the graph inputs")
            continue
        if n.op is Op.WEIGHT:
            arr = graph.params.get(n.attrs.name)
            if arr is None:
                raise VerifyError(f"weight {n.attrs.name!r} has no data")
            if tuple(arr.shape) != tuple(n.shape) or arr.dtype != n.dtype.numpy:
                raise VerifyError(f"weight {n.attrs.name!r}: data {arr.dtype}{arr.shape} vs node type {n.type}")
            continue
        expected = infer_type(n.op, n.attrs, [i.type for i in n.inputs])
        if expected != n.type:
            raise VerifyError(f"{n.op.name} at {n.where or '?'}: recorded type {n.type}, inferred {expected}")
        for d in n.shape:
            if isinstance(d, SymExpr) and not d.symbols <= set(graph.symbols):
                raise VerifyError(f"{n.op.name} at {n.where or '?'} uses unknown symbols {set(d.symbols)}")
