"""How a tensor lies across the ranks of a tensor-parallel group, and the sharder's state.

Three layouts: replicated (`None`, every rank holds all of it), `Split(axis, segments)` (each rank
holds a 1/world part of one axis) and `PARTIAL` (every rank holds a full-shape addend: the sum
over the ranks is the value, as after a row-parallel matmul).

A Split axis is a run of segments, each cut evenly over the ranks, the rank's pieces laid side by
side: a merged q|k|v projection of widths (Hq*D, Hkv*D, Hkv*D) split this way gives each rank
its own heads of q, k and v as one contiguous matrix, so the slices that take q, k and v apart
still work on every rank. A plain split is one segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..compiler import ir
from ..compiler.dtypes import DType
from ..compiler.ir import Node, TensorType
from ..compiler.ops import CollectiveAttrs, ConstAttrs, Op, PermuteAttrs, ShapeAttrs, SliceAttrs, AxisAttrs
from ..errors import LLMCError


@dataclass(frozen=True)
class Split:
    axis: int
    segments: tuple[int, ...]

    def local(self, world: int) -> tuple[int, ...]:
        return tuple(s // world for s in self.segments)

    @property
    def size(self) -> int:
        return sum(self.segments)

    def __str__(self) -> str:
        segs = "" if len(self.segments) == 1 else f" of {'|'.join(map(str, self.segments))}"
        return f"split(axis {self.axis}{segs})"


class _Partial:
    def __repr__(self) -> str:
        return "PARTIAL"


PARTIAL = _Partial()
Layout = "Split | _Partial | None"


def shard_array(a: np.ndarray, axis: int, segments: tuple[int, ...], world: int, rank: int) -> np.ndarray:
    """Rank `rank`'s part of `a` split along `axis` by `segments` (see the module doc)."""
    parts, start = [], 0
    for s in segments:
        n = s // world
        parts.append(np.take(a, np.arange(start + rank * n, start + (rank + 1) * n), axis=axis))
        start += s
    return np.ascontiguousarray(np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0])


@dataclass
class WeightShard:
    source: str  # the unsharded weight's name
    axis: int | None  # None: whole on every rank
    segments: tuple[int, ...] = ()
    per_rank: list[np.ndarray] | None = None  # rank-specific values (e.g. a vocabulary offset)


@dataclass
class Sharder:
    """State of one shard run: the rank-local node and layout of each original node."""

    world: int
    params: dict
    users: dict[int, list[Node]]
    local: dict[int, tuple[Node, object]] = field(default_factory=dict)
    weights: dict[str, WeightShard] = field(default_factory=dict)  # local weight name -> how to cut it
    _weight_nodes: dict[tuple, Node] = field(default_factory=dict)
    _replicated: dict[int, Node] = field(default_factory=dict)
    inputs: dict[int, Node] = field(default_factory=dict)  # original input uid -> its local input
    counts: dict[str, int] = field(default_factory=dict)
    gathered_at: list[str] = field(default_factory=list)  # why activations were gathered (for the report)
    # shards already cut, shared between shard runs over the same weights (the forward and the
    # step function of one model store one copy of each rank's part)
    memo: dict = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def layout(self, n: Node):
        return self.local[n.uid][1]

    def node(self, n: Node) -> Node:
        """n's rank-local node in whatever layout it has."""
        return self.local[n.uid][0]

    # ---- weights -------------------------------------------------------------------------
    def weight(self, w: Node, axis: int | None = None, segments: tuple[int, ...] = ()) -> Node:
        """A rank-local WEIGHT for the original weight `w`: whole (axis None: `w` itself) or split.
        A split keeps the weight's name (a second, different split of it gets a suffix)."""
        if axis is None:
            return w
        name = w.attrs.name
        key = (name, axis, segments)
        if key in self._weight_nodes:
            return self._weight_nodes[key]
        local_name = name if name not in self.weights else f"{name}#tp{axis}.{len(self.weights)}"
        shape = list(w.shape)
        if any(s % self.world for s in segments) or sum(segments) != shape[axis]:
            raise AssertionError(f"bad split of {name} {shape} axis {axis} by {segments}")
        shape[axis] = sum(segments) // self.world
        self.weights[local_name] = WeightShard(name, axis, segments)
        out = ir.weight_node(local_name, TensorType(tuple(shape), w.dtype))
        self._weight_nodes[key] = out
        return out

    def split_weight_nodes(self) -> list[Node]:
        return list(self._weight_nodes.values())

    def rank_constant(self, name: str, values: list[np.ndarray], dtype: DType) -> Node:
        """A weight whose value differs by rank (a vocabulary offset)."""
        if name not in self.weights:
            self.weights[name] = WeightShard(name, None, (), [np.asarray(v, dtype.numpy) for v in values])
            self._weight_nodes[(name, "rank")] = ir.weight_node(name, TensorType(tuple(values[0].shape), dtype))
        return self._weight_nodes[(name, "rank")]

    def rank_params(self, graph_weights: set[str]) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.world)]
        for name in graph_weights:
            ws = self.weights.get(name) or WeightShard(name, None)
            for r in range(self.world):
                if ws.per_rank is not None:
                    out[r][name] = ws.per_rank[r]
                elif ws.axis is None:
                    out[r][name] = self.params[ws.source]
                else:
                    key = (ws.source, id(self.params[ws.source]), ws.axis, ws.segments, self.world, r)
                    if key not in self.memo:
                        self.memo[key] = shard_array(np.asarray(self.params[ws.source]), ws.axis, ws.segments,
                                                     self.world, r)
                    out[r][name] = self.memo[key]
        return out

    # ---- making a value replicated -------------------------------------------------------
    def replicated(self, n: Node, why: str = "") -> Node:
        """n's value whole on every rank: an ALL_REDUCE of a partial sum, an ALL_GATHER of a split."""
        x, lay = self.local[n.uid]
        if lay is None:
            return x
        if n.uid in self._replicated:
            return self._replicated[n.uid]
        world = CollectiveAttrs(self.world)
        if lay is PARTIAL:
            out = ir.node(Op.ALL_REDUCE, [x], world, n.where)
            self.count("all_reduce")
        else:
            out = self._gather(n, x, lay, world)
            self.count("all_gather")
            if why:
                self.gathered_at.append(why)
        self._replicated[n.uid] = out
        return out

    def _gather(self, n: Node, x: Node, lay: Split, world: CollectiveAttrs) -> Node:
        a, w = lay.axis, self.world
        g = ir.node(Op.ALL_GATHER, [x], world, n.where)  # [world, ...local]
        r = x.type.rank
        perm = tuple(range(1, a + 1)) + (0,) + tuple(range(a + 1, r + 1))
        g = ir.node(Op.PERMUTE, [g], PermuteAttrs(perm), n.where)  # [..., world, local_a, ...]
        parts, start = [], 0
        for s in lay.local(w):
            piece = g if len(lay.segments) == 1 else ir.node(Op.SLICE, [g], SliceAttrs(a + 1, start, start + s), n.where)
            shape = list(piece.shape)
            shape[a:a + 2] = [w * s]
            parts.append(ir.node(Op.RESHAPE, [piece], ShapeAttrs(tuple(shape)), n.where))
            start += s
        return parts[0] if len(parts) == 1 else ir.node(Op.CONCAT, parts, AxisAttrs(a), n.where)


def const(value, dtype: DType) -> Node:
    return ir.node(Op.CONST, [], ConstAttrs(value, dtype))


def refuse(n: Node, why: str) -> LLMCError:
    return LLMCError(f"cannot shard {n.op.name.lower()} at {n.where or '<graph>'}: {why}")


__all__ = ["Split", "PARTIAL", "Sharder", "WeightShard", "shard_array", "const", "refuse"]
