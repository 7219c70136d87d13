"""The Graph IR: an SSA dataflow graph of immutable nodes.

A `Node` refers to its inputs directly, so a graph is just its output nodes plus the
named weights and symbolic dims; passes build new nodes rather than mutating old ones.
Nodes compare by identity (structural hashing of a deep DAG would be quadratic), and
each carries its `TensorType`, computed once by the inference table when it is made.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from ..errors import LLMCError
from .dtypes import DType
from .ops import NoAttrs, Op
from .symbolic import Dim, SymDim, SymExpr


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        short = {DType.F32: "f32", DType.F16: "f16", DType.BF16: "bf16", DType.I64: "i64", DType.I32: "i32",
                 DType.I8: "i8", DType.U8: "u8", DType.BOOL: "bool"}.get(self.dtype, self.dtype.value)
        return f"{short}[{', '.join(str(d) for d in self.shape)}]"


_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class Node:
    op: Op
    inputs: tuple["Node", ...]
    attrs: object
    type: TensorType
    where: str = ""  # provenance: the source module path or ONNX node name, for errors and dumps
    uid: int = field(default_factory=lambda: next(_ids), repr=False)

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"Node({self.op.name}, {self.type}, uid={self.uid})"


def node(op: Op, inputs: Iterable[Node] = (), attrs: object = None, where: str = "") -> Node:
    """Make a node, inferring its type (raises LLMCError naming the op on bad operands)."""
    from .infer import infer_type

    inputs = tuple(inputs)
    attrs = NoAttrs() if attrs is None else attrs
    try:
        ty = infer_type(op, attrs, [i.type for i in inputs])
    except LLMCError:
        raise
    except Exception as e:  # shape rule rejected the operands
        raise LLMCError(f"cannot type {op.name} at {where or '<graph>'}: {e}") from e
    return Node(op, inputs, attrs, ty, where)


@dataclass(frozen=True)
class Graph:
    inputs: tuple[Node, ...]  # Op.INPUT nodes, in call order
    outputs: tuple[Node, ...]
    params: Mapping[str, np.ndarray]  # weight name -> data, for Op.WEIGHT nodes
    symbols: Mapping[str, SymDim]
    output_names: tuple[str, ...] = ()

    def nodes(self) -> list[Node]:
        """All reachable nodes in a deterministic topological order (inputs first)."""
        order: list[Node] = list(self.inputs)
        seen = {n.uid for n in order}
        for out in self.outputs:
            stack: list[tuple[Node, int]] = [(out, 0)]
            while stack:
                n, i = stack.pop()
                if n.uid in seen:
                    continue
                if i < len(n.inputs):
                    stack.append((n, i + 1))
                    if n.inputs[i].uid not in seen:
                        stack.append((n.inputs[i], 0))
                else:
                    seen.add(n.uid)
                    order.append(n)
        return order

    def users(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {}
        for n in self.nodes():
            for i in n.inputs:
                out.setdefault(i.uid, []).append(n)
        return out

    def with_outputs(self, outputs: Iterable[Node], params: Mapping[str, np.ndarray] | None = None) -> "Graph":
        """The same graph with new output nodes (and params, pruned to the weights still used)."""
        outputs = tuple(outputs)
        params = dict(self.params if params is None else params)
        g = Graph(self.inputs, outputs, params, self.symbols, self.output_names)
        used = {n.attrs.name for n in g.nodes() if n.op is Op.WEIGHT}
        return Graph(self.inputs, outputs, {k: v for k, v in params.items() if k in used}, self.symbols,
                     self.output_names)

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)


def sym(name: str) -> SymExpr:
    return SymExpr.var(name)


def input_node(name: str, ty: TensorType) -> Node:
    from .ops import InputAttrs

    return Node(Op.INPUT, (), InputAttrs(name), ty, name)


def weight_node(name: str, ty: TensorType, sparse24: bool = False, gemm_rows: bool = False) -> Node:
    from .ops import WeightAttrs

    return Node(Op.WEIGHT, (), WeightAttrs(name, sparse24, gemm_rows), ty, name)
