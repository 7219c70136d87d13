"""The Program: the lowered form of a Graph, a flat list of kernel calls over buffers.

A `Kernel` is a group of Graph nodes computed by one generated function (one op here;
fusion makes the groups bigger). Kernels with the same structure are built once and
called many times (every transformer layer reuses the first layer's kernels). Buffers
are contiguous row-major tensors; a reshape is an alias of its source, not a kernel.
Memory planning fills in `Buffer.offset` into one arena.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from .dtypes import DType
from .ir import Graph, Node
from .ops import VIEWS, FullAttrs, Op
from .symbolic import Dim, SymExpr


@dataclass(frozen=True, eq=False)
class Kernel:
    name: str
    params: tuple[Node, ...]  # tensors read, produced outside the kernel (buffer order = this order)
    body: tuple[Node, ...]  # nodes computed inside, topological
    outputs: tuple[Node, ...]  # body nodes written to buffers
    symbols: tuple[str, ...]  # symbolic dims passed as trailing int64 scalars

    @property
    def anchor(self) -> Node:
        """The node that names the kernel: its most expensive op (the last non-elementwise one)."""
        from .ops import ELEMENTWISE

        heavy = [n for n in self.body if n.op not in ELEMENTWISE and n.op is not Op.CONST]
        return heavy[-1] if heavy else self.outputs[-1]


class Role(enum.Enum):
    INPUT = "input"
    WEIGHT = "weight"
    TEMP = "temp"  # produced by a kernel
    ALIAS = "alias"  # a reshaped view of another buffer


@dataclass(frozen=True)
class Buffer:
    id: int
    shape: tuple[Dim, ...]
    dtype: DType
    role: Role
    name: str = ""  # input or weight name
    alias_of: int | None = None
    offset: int | None = None  # byte offset in the arena, set by memory planning


@dataclass(frozen=True)
class Call:
    kernel: str
    args: tuple[int, ...]  # buffer ids: the kernel's params, then its outputs


@dataclass(frozen=True)
class Program:
    graph: Graph
    kernels: dict[str, Kernel]
    calls: tuple[Call, ...]
    buffers: tuple[Buffer, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    arena_bytes: Dim = 0  # planned arena size (upper bound over the symbol boxes)
    notes: dict = field(default_factory=dict)  # planner/pass statistics for reports

    def with_buffers(self, buffers: Sequence[Buffer], arena_bytes: Dim, **notes) -> "Program":
        return replace(self, buffers=tuple(buffers), arena_bytes=arena_bytes, notes={**self.notes, **notes})


Grouping = Callable[[Graph], list[list[Node]]]


def one_op_per_kernel(graph: Graph) -> list[list[Node]]:
    """The unfused partition: every computing node is its own kernel."""
    return [[n] for n in graph.nodes() if n.op not in _NOT_KERNELS]


# Inputs and weights are buffers, scalar constants are immediates inside their users,
# and lone reshapes are aliases; everything else (FULL and ARANGE too) is computed.
_NOT_KERNELS = frozenset({Op.INPUT, Op.WEIGHT, Op.CONST}) | VIEWS


def _symbols_of(nodes: Iterable[Node]) -> tuple[str, ...]:
    names: set[str] = set()
    for n in nodes:
        for d in n.shape:
            if isinstance(d, SymExpr):
                names |= d.symbols
        for v in vars(n.attrs).values() if hasattr(n.attrs, "__dict__") else ():
            for d in v if isinstance(v, tuple) else (v,):
                if isinstance(d, SymExpr):
                    names |= d.symbols
    return tuple(sorted(names))


def _signature(params: Sequence[Node], body: Sequence[Node], outputs: Sequence[Node]) -> tuple:
    """Structure of a kernel, independent of which nodes it came from (for sharing builds)."""
    index = {p.uid: ("p", i) for i, p in enumerate(params)}
    sig: list = [tuple(p.type for p in params)]
    for i, n in enumerate(body):
        index[n.uid] = ("b", i)
        sig.append((n.op, n.attrs, n.type, tuple(index[x.uid] for x in n.inputs)))
    sig.append(tuple(index[o.uid] for o in outputs))
    return tuple(sig)


def lower_to_program(graph: Graph, grouping: Grouping = one_op_per_kernel) -> Program:
    buffers: list[Buffer] = []
    buf_of: dict[int, int] = {}

    def new_buffer(n: Node, role: Role, name: str = "", alias_of: int | None = None) -> int:
        buffers.append(Buffer(len(buffers), n.shape, n.dtype, role, name, alias_of))
        buf_of[n.uid] = len(buffers) - 1
        return buf_of[n.uid]

    inputs = tuple(new_buffer(n, Role.INPUT, n.attrs.name) for n in graph.inputs)
    groups = grouping(graph)
    group_of = {n.uid: gi for gi, g in enumerate(groups) for n in g}
    users = graph.users()
    out_ids = {o.uid for o in graph.outputs}

    kernels: dict[str, Kernel] = {}
    by_signature: dict[tuple, str] = {}
    calls: list[Call] = []
    emitted: set[int] = set()
    counts: dict[str, int] = {}

    def ensure(n: Node) -> int:
        """Buffer holding n's value, for nodes that are not produced by a kernel."""
        if n.uid in buf_of:
            return buf_of[n.uid]
        if n.op is Op.WEIGHT:
            return new_buffer(n, Role.WEIGHT, n.attrs.name)
        if n.op in VIEWS:
            src = ensure(n.inputs[0])
            return new_buffer(n, Role.ALIAS, alias_of=src)
        if n.op is Op.CONST:  # a scalar constant that is itself a graph output
            return emit_constant(n)
        emit_group(group_of[n.uid])
        return buf_of[n.uid]

    def emit_constant(n: Node) -> int:
        """Constants are immediates inside their users; one that is an output gets a tiny
        kernel filling its 0-d buffer (a FULL node with the same value and dtype)."""
        full = Node(Op.FULL, (), FullAttrs((), n.attrs.value, n.attrs.dtype), n.type, n.where)
        buf = new_buffer(full, Role.TEMP)
        buf_of[n.uid] = buf
        name = "full_const_" + str(len([k for k in kernels if k.startswith("full_const_")]))
        kernels[name] = Kernel(name, (), (full,), (full,), ())
        calls.append(Call(name, (buf,)))
        return buf

    def emit_group(gi: int) -> None:
        if gi in emitted:
            return
        emitted.add(gi)
        group = groups[gi]
        members = {n.uid for n in group}
        body: list[Node] = []
        params: list[Node] = []
        seen: set[int] = set()
        for n in group:
            for x in n.inputs:
                if x.uid in members or x.uid in seen:
                    continue
                seen.add(x.uid)
                if x.op is Op.CONST:  # scalars become immediates inside the kernel
                    body.append(x)
                else:
                    params.append(x)
            body.append(n)
        outputs = [n for n in group if n.uid in out_ids or any(u.uid not in members for u in users.get(n.uid, []))]
        arg_bufs = [ensure(p) for p in params]
        out_bufs = [new_buffer(o, Role.TEMP) for o in outputs]
        sig = _signature(params, body, outputs)
        name = by_signature.get(sig)
        if name is None:
            anchor = Kernel("", tuple(params), tuple(body), tuple(outputs), ()).anchor.op.name.lower()
            counts[anchor] = counts.get(anchor, -1) + 1
            name = f"{anchor}_{counts[anchor]}"
            by_signature[sig] = name
            kernels[name] = Kernel(name, tuple(params), tuple(body), tuple(outputs),
                                   _symbols_of([*params, *body]))
        calls.append(Call(name, tuple(arg_bufs + out_bufs)))

    for gi in range(len(groups)):
        emit_group(gi)
    outputs = tuple(ensure(o) for o in graph.outputs)
    return Program(graph, kernels, tuple(calls), tuple(buffers), inputs, outputs)
