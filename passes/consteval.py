"""Evaluate subgraphs that depend on no graph input (only on shapes, constants and weights),
for one binding of the symbolic dims: how passes prove a mask causal or an index a repeat."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..compiler.ir import Node
from ..compiler.ops import Op
from ..compiler.reference import run_op
from ..compiler.symbolic import SymDim, SymExpr, evaluate

MAX_ELEMENTS = 1 << 23  # larger evaluations are skipped (checking is then less exhaustive)


def ancestors(n: Node) -> list[Node]:
    """n and everything it reads, topologically ordered."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(n, False)]
    while stack:
        x, done = stack.pop()
        if done:
            order.append(x)
            continue
        if x.uid in seen:
            continue
        seen.add(x.uid)
        stack.append((x, True))
        stack.extend((i, False) for i in x.inputs if i.uid not in seen)
    return order


def is_shape_only(n: Node) -> bool:
    """True when n reads no graph input: a pure function of the symbolic dims (and weights)."""
    return all(a.op is not Op.INPUT for a in ancestors(n))


def symbols_of(nodes) -> set[str]:
    out: set[str] = set()
    for n in nodes:
        for d in n.shape:
            if isinstance(d, SymExpr):
                out |= d.symbols
        for v in (vars(n.attrs).values() if hasattr(n.attrs, "__dict__") else ()):
            for d in v if isinstance(v, tuple) else (v,):
                if isinstance(d, SymExpr):
                    out |= d.symbols
    return out


def _numel(n: Node, env: Mapping[str, int]) -> int:
    k = 1
    for d in n.shape:
        k *= evaluate(d, env)
    return k


def evaluate_node(n: Node, env: Mapping[str, int], params: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """n's value for symbol values `env`; None if it reads an input or is too large to evaluate."""
    nodes = ancestors(n)
    values: dict[int, np.ndarray] = {}
    for x in nodes:
        if x.op is Op.INPUT:
            return None
        if _numel(x, env) > MAX_ELEMENTS:
            return None
        if x.op is Op.WEIGHT:
            values[x.uid] = np.asarray(params[x.attrs.name])
        else:
            values[x.uid] = run_op(x.op, x.attrs, [values[i.uid] for i in x.inputs], env, x.dtype)
    return values[n.uid]


def sample_envs(names, symbols: Mapping[str, SymDim]) -> list[dict[str, int]]:
    """A few bindings of the symbols, from their lower bounds up to their upper bounds."""
    names = sorted(names)
    if not names:
        return [{}]
    envs = []
    for step in (0, 1, 2, 5, 13, "q", "h", "hi"):
        env = {}
        for s in names:
            b = symbols[s]
            v = {"q": b.hi // 4, "h": b.hi // 2, "hi": b.hi}.get(step, None) if isinstance(step, str) else b.lo + step
            env[s] = min(max(v, b.lo), b.hi)
        if env not in envs:
            envs.append(env)
    for s in names:  # one symbol large, the others small: big sequences with batch 1
        for v in (symbols[s].hi // 2, symbols[s].hi):
            env = {t: symbols[t].lo for t in names}
            env[s] = min(max(v, symbols[s].lo), symbols[s].hi)
            if env not in envs:
                envs.append(env)
    return envs
