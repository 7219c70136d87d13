"""Run a Graph on numpy arrays with the reference semantics (the oracle for every test)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .ir import Graph, Node
from .ops import Op
from .reference import run_op
from .symbolic import SymDim, SymExpr, evaluate


def bind_symbols(inputs: Sequence[Node], arrays: Sequence[np.ndarray], symbols: Mapping[str, SymDim]) -> dict[str, int]:
    """Read symbol values off the input shapes, checking rank, static dims and bounds."""
    env: dict[str, int] = {}
    for node, arr in zip(inputs, arrays):
        name = node.attrs.name
        if arr.ndim != node.type.rank:
            raise InputError(f"input {name!r}: expected rank {node.type.rank} {node.type}, got shape {arr.shape}")
        for axis, (d, actual) in enumerate(zip(node.type.shape, arr.shape)):
            if isinstance(d, SymExpr) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
                s = d.terms[0][0][0]
                if s in env and env[s] != actual:
                    raise InputError(f"input {name!r} dim {axis}: {s}={actual} disagrees with {s}={env[s]} from another input")
                b = symbols[s]
                if not b.lo <= actual <= b.hi:
                    raise InputError(f"input {name!r} dim {axis} ({s}) = {actual} is outside its bounds [{b.lo}, {b.hi}]")
                env[s] = actual
    for node, arr in zip(inputs, arrays):
        for axis, (d, actual) in enumerate(zip(node.type.shape, arr.shape)):
            if evaluate(d, env) != actual:
                raise InputError(f"input {node.attrs.name!r} dim {axis}: expected {d} = {evaluate(d, env)}, got {actual}")
    return env


def interpret(graph: Graph, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(arrays) != len(graph.inputs):
        raise InputError(f"expected {len(graph.inputs)} inputs, got {len(arrays)}")
    arrays = [np.asarray(a) for a in arrays]
    for node, arr in zip(graph.inputs, arrays):
        if arr.dtype != node.dtype.numpy:
            raise InputError(f"input {node.attrs.name!r}: expected dtype {node.dtype.value}, got {arr.dtype}")
    env = bind_symbols(graph.inputs, arrays, graph.symbols)
    values: dict[int, np.ndarray] = {n.uid: a for n, a in zip(graph.inputs, arrays)}
    for n in graph.nodes():
        if n.uid in values:
            continue
        if n.op is Op.WEIGHT:
            values[n.uid] = np.asarray(graph.params[n.attrs.name])
            continue
        values[n.uid] = run_op(n.op, n.attrs, [values[i.uid] for i in n.inputs], env, n.dtype)
    return [values[o.uid] for o in graph.outputs]
