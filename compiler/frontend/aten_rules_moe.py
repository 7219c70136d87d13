"""ATen rules for mixture-of-experts routing: top-k, and the few generic ops the routed
experts need (`repeat_interleave` by an int, the in-place `/=` of routing weights).

Hugging Face experts blocks are captured in their `batched_mm` form (see moe_capture.py):
each (token, chosen expert) pair gathers its expert's matrix, `w[ids]`, and multiplies
with `bmm`; passes/fuse_moe.py turns that gather + matmul into `Op.ROUTED_MATMUL`.

Importing this module adds its rules to aten_rules.RULES (aten_rules imports it on its
last line). The generic ones are added only where no rule exists yet, so a broader rule
of aten_rules (in-place ops, repeats) wins.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir import Node
from ..ops import AxisAttrs, Op, ShapeAttrs, TopkAttrs
from . import aten_rules

aten = torch.ops.aten


def _axis(cx, a: int, rank: int) -> int:
    if not -rank <= a < max(rank, 1):
        raise cx.unsupported(f"axis {a} out of range for rank {rank}")
    return a % rank if rank else 0


def _topk(cx, x: Node, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """values, indices; indices best first also when sorted=False (any order is allowed then)."""
    axis = _axis(cx, dim, x.type.rank)
    if not isinstance(k, int):
        raise cx.unsupported("top-k with a symbolic k")
    if not isinstance(x.shape[axis], int):
        raise cx.unsupported(f"top-k along a symbolic axis ({x.shape[axis]})")
    idx = cx.node(Op.TOPK, (x,), TopkAttrs(k, axis, bool(largest)))
    values = cx.node(Op.GATHER, (x, idx), AxisAttrs(axis))
    return [values, idx]


def _repeat_interleave_int(cx, x: Node, repeats, dim=None, *, output_size=None):
    """Each element `repeats` times in a row along dim (flattened first when dim is None):
    x [.., n, ..] -> [.., n, r, ..] (expand) -> [.., n * r, ..]."""
    if not isinstance(repeats, int):
        raise cx.unsupported("repeat_interleave by a tensor or symbolic count")
    if dim is None:
        x = cx.reshape(x, (_numel(x.shape),))
        dim = 0
    axis = _axis(cx, dim, x.type.rank)
    split = tuple(x.shape[:axis + 1]) + (1,) + tuple(x.shape[axis + 1:])
    grown = tuple(x.shape[:axis + 1]) + (repeats,) + tuple(x.shape[axis + 1:])
    y = cx.reshape(x, split)
    if repeats != 1:
        y = cx.node(Op.EXPAND, (y,), ShapeAttrs(grown))
    return cx.reshape(y, cx.out_shape())


def _numel(shape):
    n = 1
    for d in shape:
        n = d * n
    return n


def _aliases(n: torch.fx.Node) -> bool:
    """Does the op's result share storage with an argument (a view)?"""
    schema = getattr(n.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _in_place(functional: Callable):
    """An in-place op as its functional form. torch.export already points later reads of
    the updated tensor at the in-place node; what it cannot redirect is a view of the
    tensor, so an update of a view, or of a tensor some view reads, is refused."""
    def convert(cx, x, *args, **kwargs):
        me = cx.fx
        target = me.args[0]
        if isinstance(target, torch.fx.Node):
            order = {n: i for i, n in enumerate(me.graph.nodes)}
            if target.op == "call_function" and _aliases(target):
                raise cx.unsupported("in-place update of a view")
            for u in target.users:
                if u is not me and (order[u] > order[me] or _aliases(u)):
                    raise cx.unsupported(f"in-place update read afterwards through '{u.name}'")
        return functional(cx, x, *args, **kwargs)
    return convert


def register(rules: dict) -> None:
    rules[aten.topk.default] = _topk
    rules.setdefault(aten.repeat_interleave.self_int, _repeat_interleave_int)
    div = rules.get(aten.div.Tensor)
    if div is not None:
        rules.setdefault(aten.div_.Tensor, _in_place(div))


register(aten_rules.RULES)
