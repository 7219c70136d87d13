"""Rules `(pattern, replacement)` and the driver that applies them to a Graph.

`rewrite(graph, rules)` rebuilds the graph in topological order (bottom-up), trying the
rules at every node against the *previous* round's graph, so a bigger pattern rooted
further down still sees the original structure (a smaller match below it just becomes
dead code), and repeats until a round changes nothing. Rebuilt nodes are memoised per
round, so shared subgraphs are rewritten once. Interior nodes of a match must have no
users outside it (`exclusive`), so fusing never duplicates work something else reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..compiler import ir
from ..compiler.dtypes import DType
from ..compiler.ir import Graph, Node
from ..compiler.ops import CastAttrs, Op
from .pattern import Alt, Check, Match, MeanLast, OptCast, P, Pattern, Prod


@dataclass
class Rule:
    name: str
    pattern: Pattern
    replace: Callable[[Match], Node | None]
    exclusive: bool = True  # interior nodes may not have users outside the match


def as_rule(r) -> Rule:
    if isinstance(r, Rule):
        return r
    if len(r) == 2:
        pat, fn = r
        return Rule(getattr(fn, "__name__", "rule"), pat, fn)
    return Rule(*r)


def _root_ops(p: Pattern) -> frozenset[Op] | None:
    """Ops a pattern's root can have (None: any), to index rules by the node's op."""
    if isinstance(p, P):
        return p.ops
    if isinstance(p, Prod):
        return frozenset({Op.MUL, Op.DIV})
    if isinstance(p, MeanLast):
        return frozenset({Op.MEAN, Op.MUL, Op.DIV})
    if isinstance(p, Alt):
        out: set[Op] = set()
        for a in p.alts:
            r = _root_ops(a)
            if r is None:
                return None
            out |= r
        return frozenset(out)
    if isinstance(p, OptCast):
        r = _root_ops(p.inner)
        return None if r is None else r | {Op.CAST}
    if isinstance(p, Check):
        return _root_ops(p.inner)
    return None


class _Context:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.params = dict(graph.params)
        self.new_of: dict[int, Node] = {}
        self.users: dict[int, list[Node]] = {}

    def new(self, n: Node) -> Node:
        return self.new_of.get(n.uid, n)

    def add_param(self, name: str, array: np.ndarray) -> Node:
        base, k = name, 1
        while name in self.params and not (self.params[name].shape == array.shape
                                           and np.array_equal(self.params[name], array)):
            name = f"{base}.{k}"
            k += 1
        self.params[name] = array
        return ir.weight_node(name, ir.TensorType(tuple(array.shape), DType.from_numpy(array.dtype)))


def rebuild(n: Node, inputs: Sequence[Node]) -> Node:
    """`n` over new inputs (the same node when nothing changed)."""
    if all(a is b for a, b in zip(inputs, n.inputs)):
        return n
    return ir.node(n.op, inputs, n.attrs, n.where)


def substitute(graph: Graph, mapping: Mapping[int, Node], params: Mapping[str, np.ndarray] | None = None) -> Graph:
    """The graph with some nodes (by uid) replaced and everything downstream rebuilt. The
    replacements may read nodes of the old graph; those reads are rebased onto the new one."""
    new_of: dict[int, Node] = {}

    def rebase(r: Node) -> Node:
        if r.uid not in new_of:
            new_of[r.uid] = rebuild(r, [rebase(i) for i in r.inputs])
        return new_of[r.uid]

    for n in graph.nodes():
        if n.uid in mapping:
            new_of[n.uid] = rebase(mapping[n.uid])
        else:
            new_of[n.uid] = rebuild(n, [new_of[i.uid] for i in n.inputs])
    return graph.with_outputs([new_of[o.uid] for o in graph.outputs], params)


def rewrite(graph: Graph, rules: Iterable, max_rounds: int = 16, max_matches: int = 16) -> tuple[Graph, dict[str, int]]:
    """Apply rules bottom-up to a fixpoint. Returns the new graph and, per rule name, how
    many of its replacements are live in the result."""
    rules = [as_rule(r) for r in rules]
    by_op: dict[Op, list[Rule]] = {}
    any_op: list[Rule] = []
    for r in rules:
        ops = _root_ops(r.pattern)
        if ops is None:
            any_op.append(r)
        else:
            for o in ops:
                by_op.setdefault(o, []).append(r)
    order = {id(r): i for i, r in enumerate(rules)}
    counts: dict[str, int] = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        ctx = _Context(graph)
        users = ctx.users = graph.users()
        outs = {o.uid for o in graph.outputs}
        fired: list[tuple[str, Node]] = []
        for n in graph.nodes():
            if n.op is Op.INPUT or n.op is Op.WEIGHT:
                continue
            candidates = sorted(by_op.get(n.op, []) + any_op, key=lambda r: order[id(r)])
            result = None
            for rule in candidates:
                result = _try_rule(rule, n, ctx, users, outs, max_matches)
                if result is not None:
                    fired.append((rule.name, result))
                    break
            ctx.new_of[n.uid] = result if result is not None else rebuild(n, [ctx.new(i) for i in n.inputs])
        if not fired:
            break
        new_graph = graph.with_outputs([ctx.new(o) for o in graph.outputs], ctx.params)
        live = {x.uid for x in new_graph.nodes()}
        for name, r in fired:
            if r.uid in live:
                counts[name] += 1
        graph = new_graph
    return graph, counts


def _try_rule(rule: Rule, n: Node, ctx: _Context, users, outs, max_matches: int) -> Node | None:
    m = Match(n, ctx)
    tries = 0
    for _ in rule.pattern.match(n, m):
        tries += 1
        r = rule.replace(m)
        if r is not None and rule.exclusive and not _exclusive(m, n, users, outs):
            r = None
        m.claimed.clear()
        if r is not None:
            if tuple(r.shape) != tuple(n.shape):
                r = None  # a rule that would change the shape declines (e.g. a broadcast constant)
            elif r.dtype is not n.dtype:
                r = ir.node(Op.CAST, [r], CastAttrs(n.dtype), n.where)
        if r is not None:
            return r
        if tries >= max_matches:
            break
    return None


def _exclusive(m: Match, root: Node, users, outs) -> bool:
    inside = {x.uid for x in m.matched} | {x.uid for x in m.claimed} | {root.uid}
    for x in list(m.matched) + list(m.claimed):
        if x is root or x.uid in m.shared or x.op in (Op.CONST, Op.INPUT, Op.WEIGHT):
            continue
        if x.uid in outs or any(u.uid not in inside for u in users.get(x.uid, ())):
            return False
    return True


def count_ops(graph: Graph, *ops: Op) -> int:
    return sum(1 for n in graph.nodes() if n.op in ops)
