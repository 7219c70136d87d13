"""Horizontal merge of projections that read the same activation: Q/K/V, gate/up.

MATMUL(x, W_i) for weights W_i ([K, N_i] WEIGHTs, or PERMUTE(WEIGHT) of [N_i, K]) sharing x
become one MATMUL(x, concat(W_i)) and SLICEs of its last axis; when every projection is
followed by the add of a [N_i] weight bias, the biases are merged too. The concatenated
arrays are made here, at compile time; the old weights drop out of Graph.params.
"""
from __future__ import annotations

import os
import re
import time

import numpy as np

from ..compiler import ir
from ..compiler.dtypes import DType
from ..compiler.ir import Graph, Node, TensorType
from ..compiler.ops import Op, SliceAttrs
from .rewrite import substitute
from .report import PassReport


def _weight_of(w: Node, params) -> np.ndarray | None:
    """[K, N] data of a matmul's right operand, if it is a plain or transposed 2-D weight."""
    if w.op is Op.WEIGHT and w.type.rank == 2:
        return params[w.attrs.name]
    if w.op is Op.PERMUTE and w.attrs.perm == (1, 0) and w.inputs[0].op is Op.WEIGHT:
        return params[w.inputs[0].attrs.name].T
    return None


def _weight_name(w: Node) -> str:
    return (w if w.op is Op.WEIGHT else w.inputs[0]).attrs.name


def _bias(mm: Node, users, params) -> tuple[Node, str, np.ndarray] | None:
    us = users.get(mm.uid, [])
    if len(us) != 1 or us[0].op is not Op.ADD:
        return None
    add = us[0]
    b = add.inputs[1] if add.inputs[0] is mm else add.inputs[0]
    n = mm.shape[-1]
    if b.op is not Op.WEIGHT or tuple(b.shape) != (n,) or add.type != mm.type:
        return None
    return add, b.attrs.name, params[b.attrs.name]


def _merged_name(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    rev = [n[len(prefix):][::-1] for n in names]
    suffix = os.path.commonprefix(rev)[::-1]
    suffix = suffix[suffix.find("."):] if "." in suffix else ""
    mids = [n[len(prefix): len(n) - len(suffix)] for n in names]
    return prefix + "+".join(mids) + suffix


_ROLES = {"q": "q", "query": "q", "k": "k", "key": "k", "v": "v", "value": "v", "gate": "gate", "up": "up"}


def _kind(group: list[Node], names: list[str]) -> str:
    """'qkv' / 'gate_up' from weight names or provenance (ONNX weights may be anonymous)."""
    roles = []
    for u, name in zip(group, names):
        toks = re.split(r"[^a-z0-9]+", f"{name} {u.where}".lower())
        found = {_ROLES[t] for t in toks if t in _ROLES}
        roles.append(found.pop() if len(found) == 1 else None)
    if sorted(map(str, roles)) == ["k", "q", "v"]:
        return "qkv"
    if sorted(map(str, roles)) == ["gate", "up"]:
        return "gate_up"
    return f"{len(names)}-way"


def merge_projections(graph: Graph, min_group: int = 2) -> tuple[Graph, PassReport]:
    t0 = time.perf_counter()
    users = graph.users()
    params = dict(graph.params)
    mapping: dict[int, Node] = {}
    kinds: dict[str, int] = {}
    for x in graph.nodes():
        mms = [u for u in users.get(x.uid, []) if u.op is Op.MATMUL and u.inputs[0] is x
               and u.inputs[1] is not x and _weight_of(u.inputs[1], params) is not None]
        if len(mms) < min_group:
            continue
        # one group per (dtype, K); deterministic order: as they appear in the graph
        by_key: dict[tuple, list[Node]] = {}
        for u in mms:
            by_key.setdefault((u.inputs[1].dtype, u.inputs[1].shape[0], u.dtype), []).append(u)
        for group in by_key.values():
            if len(group) < min_group:
                continue
            arrays = [_weight_of(u.inputs[1], params) for u in group]
            names = [_weight_name(u.inputs[1]) for u in group]
            name = _merged_name(names)
            while name in params:
                name += "_"
            cat = np.ascontiguousarray(np.concatenate(arrays, axis=1))
            params[name] = cat
            w = ir.weight_node(name, TensorType(tuple(cat.shape), DType.from_numpy(cat.dtype)))
            where = os.path.commonprefix([u.where for u in group]).rstrip(".")
            mm = ir.node(Op.MATMUL, [x, w], None, where)
            biases = [_bias(u, users, params) for u in group]
            out = mm
            if all(b is not None for b in biases):
                bname = _merged_name([b[1] for b in biases])
                while bname in params:
                    bname += "_"
                bcat = np.concatenate([b[2] for b in biases])
                params[bname] = bcat
                bw = ir.weight_node(bname, TensorType(tuple(bcat.shape), DType.from_numpy(bcat.dtype)))
                out = ir.node(Op.ADD, [mm, bw], None, where)
            axis = mm.type.rank - 1
            start = 0
            for u, b in zip(group, biases):
                n = u.shape[-1]
                sl = ir.node(Op.SLICE, [out], SliceAttrs(axis, start, start + n), u.where)
                mapping[(b[0] if out is not mm else u).uid] = sl
                start += n
            k = _kind(group, names)
            kinds[k] = kinds.get(k, 0) + 1
    if mapping:
        graph = substitute(graph, mapping, params)
    lines = [f"{k}: {v} merged" for k, v in sorted(kinds.items())] or ["nothing to merge"]
    return graph, PassReport("merge_projections", {f"{k}_merged": v for k, v in kinds.items()}, lines,
                             time.perf_counter() - t0)
