"""ATen rules for mixture-of-experts routing: top-k. (The generic ops the routed experts
also need, `repeat_interleave` by an int and the in-place `/=` of the routing weights, are
in aten_rules_composite.py.)

Hugging Face experts blocks are captured in their `batched_mm` form (see moe_capture.py):
each (token, chosen expert) pair gathers its expert's matrix, `w[ids]`, and multiplies
with `bmm`; passes/fuse_moe.py turns that gather + matmul into `Op.ROUTED_MATMUL`.

Importing this module adds its rules to aten_rules.RULES (aten_rules imports it on its
last line).
"""
from __future__ import annotations

import torch

from ..ir import Node
from ..ops import AxisAttrs, Op, TopkAttrs
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


def register(rules: dict) -> None:
    rules[aten.topk.default] = _topk


register(aten_rules.RULES)
