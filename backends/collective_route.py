"""Kernels that are one collective (ALL_REDUCE, ALL_GATHER) run as the runtime's communicator
call (route "coll"), on every device: the group's other ranks are processes the runtime joined
(runtime/dist), not something a compiled kernel can reach. CUDA passes the buffers' device
pointers and the stream to NCCL (so a CUDA graph captures the call); the CPU passes numpy arrays
to the host communicator."""
from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel
from llmc.compiler.symbolic import Dim, to_json

COLL_FUNCS = {Op.ALL_REDUCE: "all_reduce", Op.ALL_GATHER: "all_gather"}


@dataclass(frozen=True)
class CollectiveRoute:
    """x, out: the call's 2 arguments in order; scalars: the group size."""

    func: str
    shapes: tuple[tuple[Dim, ...], ...]
    world: int

    @property
    def label(self) -> str:
        return f"{self.func.replace('_', '-')} over {self.world} ranks"

    def to_json(self) -> dict:
        return {"route": "coll", "func": self.func, "label": self.label, "scalars": [self.world],
                "tensors": [{"arg": i, "shape": [to_json(d) for d in s]} for i, s in enumerate(self.shapes)]}


def match_collective(kernel: Kernel) -> CollectiveRoute | None:
    body = [n for n in kernel.body if n.op is not Op.CONST]
    if len(body) != 1 or body[0].op not in COLL_FUNCS or list(kernel.outputs) != body:
        return None
    n = body[0]
    if [p.uid for p in kernel.params] != [n.inputs[0].uid]:
        return None
    return CollectiveRoute(COLL_FUNCS[n.op], (tuple(n.inputs[0].shape), tuple(n.shape)), n.attrs.world)


@dataclass(frozen=True)
class PointToPointRoute:
    """SEND (x, out: out is x, kept live) or RECV (out) between pipeline stages; scalars: the peer."""

    func: str
    shapes: tuple[tuple[Dim, ...], ...]
    peer: int

    @property
    def label(self) -> str:
        return f"{self.func} {'to' if self.func == 'send' else 'from'} stage {self.peer}"

    def to_json(self) -> dict:
        return {"route": "p2p", "func": self.func, "label": self.label, "scalars": [self.peer],
                "tensors": [{"arg": i, "shape": [to_json(d) for d in s]} for i, s in enumerate(self.shapes)]}


def match_point_to_point(kernel: Kernel) -> PointToPointRoute | None:
    body = [n for n in kernel.body if n.op is not Op.CONST]
    if len(body) != 1 or body[0].op not in (Op.SEND, Op.RECV) or list(kernel.outputs) != body:
        return None
    n = body[0]
    if [p.uid for p in kernel.params] != [i.uid for i in n.inputs]:
        return None
    shapes = tuple(tuple(x.shape) for x in (*n.inputs, n))
    return PointToPointRoute("send" if n.op is Op.SEND else "recv", shapes, n.attrs.peer)


def match_runtime_comm(kernel: Kernel):
    """The communicator route of a kernel that is one collective or send/recv, else None."""
    return match_collective(kernel) or match_point_to_point(kernel)


__all__ = ["match_collective", "match_point_to_point", "match_runtime_comm", "CollectiveRoute",
           "PointToPointRoute", "COLL_FUNCS"]
