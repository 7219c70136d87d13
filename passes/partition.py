"""Kernel grouping: which Graph nodes each generated kernel computes.

A kernel holds at most one heavy op (an anchor: MATMUL, ATTENTION, a norm, softmax, a
reduction) plus injective ops fused around it, which the TVM backend inlines:
  1. prologues: an anchor absorbs injective producers all of whose users are already in
     its kernel (rotary math and head reshapes into ATTENTION's q/k/v loads, casts into
     norms); a MATMUL only absorbs data movement and casts (a weight transpose or
     dequantize), since arithmetic there would be recomputed per output tile;
  2. epilogues: an anchor absorbs elementwise consumers of its output's shape (bias add,
     activation, residual add into a MATMUL); ATTENTION and norms also absorb reshapes
     and permutes (writing heads back as [B, S, H*D]);
  3. what is left (SwiGLU, embedding gathers, mask building) fuses into elementwise
     kernels along producer -> consumer edges.
Every merge is checked on the condensed kernel graph (networkx), which must stay a DAG.
Reshapes left on their own are views (aliases), not kernels.
"""
from __future__ import annotations

import heapq
from collections import Counter
from typing import Callable

import networkx as nx

from ..compiler.ir import Graph, Node
from ..compiler.ops import ELEMENTWISE, Op
from .report import kernels_per_layer

HEAVY = frozenset({Op.MATMUL, Op.QMATMUL, Op.ATTENTION, Op.PAGED_ATTENTION, Op.RMS_NORM, Op.LAYER_NORM, Op.SOFTMAX, Op.SUM, Op.MEAN, Op.MAX,
                   Op.MIN, Op.CUMSUM})
DATA_MOVEMENT = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.CONCAT, Op.TAKE, Op.INDEX, Op.GATHER,
                           Op.QTAKE})  # (QTAKE: a gather whose loads dequantize, as injective as TAKE)
INJECTIVE = ELEMENTWISE | DATA_MOVEMENT | {Op.FULL, Op.ARANGE}
NOT_COMPUTED = frozenset({Op.INPUT, Op.WEIGHT, Op.CONST})
MATMUL_PROLOGUE = frozenset({Op.RESHAPE, Op.PERMUTE, Op.CAST, Op.SLICE, Op.EXPAND, Op.FULL, Op.ARANGE})
LAYOUT_EPILOGUE = frozenset({Op.RESHAPE, Op.PERMUTE})
GEMMS = frozenset({Op.MATMUL, Op.QMATMUL})  # anchors with GEMM fusion rules (a quantized one dequantizes in its loads)


# Ops every backend runs as a library call of the runtime (a kernel of their own, operands as they are)
RUNTIME_OPS = frozenset({Op.PAGED_ATTENTION, Op.ALL_REDUCE, Op.ALL_GATHER, Op.SEND, Op.RECV})


class _Partition:
    def __init__(self, graph: Graph, library_op: Callable[[Node], bool] | None = None,
                 runtime_ops: frozenset = RUNTIME_OPS) -> None:
        library = library_op or (lambda n: False)
        self.library_call = lambda n: n.op in runtime_ops or library(n)  # a kernel of its own, run by a library
        self.nodes = [n for n in graph.nodes() if n.op not in NOT_COMPUTED]
        self.idx = {n.uid: i for i, n in enumerate(self.nodes)}
        self.users: dict[int, list[Node]] = {n.uid: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i.uid in self.idx and n not in self.users[i.uid]:
                    self.users[i.uid].append(n)
        self.outputs = {o.uid for o in graph.outputs}
        self.group = {n.uid: n.uid for n in self.nodes}  # node -> group id (a member's uid)
        self.members = {n.uid: [n] for n in self.nodes}
        self.heavy = {n.uid: (n if n.op in HEAVY else None) for n in self.nodes}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(self.group)
        for n in self.nodes:
            for i in n.inputs:
                if i.uid in self.idx:
                    self.dag.add_edge(i.uid, n.uid)
        self.checks = 0

    # -- merging -------------------------------------------------------------------------
    def creates_cycle(self, a: int, b: int) -> bool:
        """Would contracting kernels a and b close a cycle (a path between them through a third)?"""
        self.checks += 1
        for s, t in ((a, b), (b, a)):
            for c in self.dag.successors(s):
                if c != t and nx.has_path(self.dag, c, t):
                    return True
        return False

    def merge(self, a: int, b: int, check: bool = True) -> bool:
        """Merge kernel b into kernel a (ids are kernel ids); False if it would make a cycle."""
        if a == b:
            return True
        if check and self.creates_cycle(a, b):
            return False
        if self.heavy[a] is not None and self.heavy[b] is not None:
            raise AssertionError("two anchors in one kernel")
        for n in self.members[b]:
            self.group[n.uid] = a
        self.members[a].extend(self.members.pop(b))
        self.heavy[a] = self.heavy[a] or self.heavy.pop(b)
        self.heavy.pop(b, None)
        for p in list(self.dag.predecessors(b)):
            if p != a:
                self.dag.add_edge(p, a)
        for s in list(self.dag.successors(b)):
            if s != a:
                self.dag.add_edge(a, s)
        self.dag.remove_node(b)
        return True

    def gid(self, n: Node) -> int:
        return self.group[n.uid]

    def alone(self, n: Node) -> bool:
        return len(self.members[self.gid(n)]) == 1 and self.heavy[self.gid(n)] is None

    # -- phases --------------------------------------------------------------------------
    def prologues(self, h: Node) -> None:
        g = self.gid(h)
        if self.library_call(h):  # a library GEMM reads its operands as they are; W^T with trans_b
            w = h.inputs[1] if h.op is Op.MATMUL else None
            if w is not None and is_transposed_2d(w) and w.uid in self.idx and self.alone(w) and w.uid not in self.outputs \
                    and all(u is h for u in self.users[w.uid]):
                self.merge(g, self.gid(w), check=False)
            return
        allowed = MATMUL_PROLOGUE if h.op in GEMMS else INJECTIVE
        heap: list[tuple[int, int, Node]] = []
        seen: set[int] = set()

        def push(n: Node) -> None:
            for i in n.inputs:
                if i.uid in self.idx and i.uid not in seen:
                    seen.add(i.uid)
                    heapq.heappush(heap, (-self.idx[i.uid], i.uid, i))

        push(h)
        while heap:  # latest producers first, so a node's users are decided before it
            _, _, p = heapq.heappop(heap)
            if p.op not in allowed or not self.alone(p) or p.uid in self.outputs:
                continue
            if all(self.gid(u) == g for u in self.users[p.uid]):
                # safe without a search: every edge out of p lands in this kernel
                self.merge(g, self.gid(p), check=False)
                push(p)

    def epilogues(self, h: Node) -> None:
        g = self.gid(h)
        changed = True
        while changed:
            changed = False
            frontier = sorted({u.uid: u for m in self.members[g] for u in self.users[m.uid]
                               if self.gid(u) != g}.values(), key=lambda u: self.idx[u.uid])
            for c in frontier:
                if not self.alone(c) or not self._epilogue_ok(h, c, g):
                    continue
                if self.merge(g, self.gid(c)):
                    changed = True

    def _epilogue_ok(self, h: Node, c: Node, g: int) -> bool:
        inside = [i for i in c.inputs if i.uid in self.idx and self.gid(i) == g]
        if c.op in ELEMENTWISE:
            return all(tuple(i.shape) == tuple(c.shape) for i in inside)
        if c.op is Op.RESHAPE:
            return True
        return h.op not in GEMMS and c.op in LAYOUT_EPILOGUE

    def leftovers(self) -> None:
        for n in self.nodes:
            if self.heavy[self.gid(n)] is not None or n.op not in INJECTIVE:
                continue
            for p in n.inputs:
                if p.uid not in self.idx or p.op not in INJECTIVE:
                    continue
                gp, gn = self.gid(p), self.gid(n)
                if gp != gn and self.heavy[gp] is None:
                    self.merge(gp, gn)

    def run(self) -> list[list[Node]]:
        # attention first: rotary math belongs to its q/k loads and the head transpose to its
        # output store, rather than to the neighbouring GEMMs; then GEMMs, so a residual add
        # becomes a GEMM epilogue rather than a prologue of the next norm
        attention = [n for n in self.nodes if n.op is Op.ATTENTION]
        matmul = [n for n in self.nodes if n.op in GEMMS]
        rest = [n for n in self.nodes if n.op in HEAVY and n.op not in GEMMS and n.op is not Op.ATTENTION]
        for anchors in (attention, matmul, rest):
            for h in anchors:
                self.prologues(h)
            for h in anchors:
                if not self.library_call(h):  # a library GEMM's epilogue fuses with its consumers
                    self.epilogues(h)
        self.leftovers()
        if not nx.is_directed_acyclic_graph(self.dag):
            raise AssertionError("kernel graph has a cycle")
        lo = {g: min(self.idx[n.uid] for n in ms) for g, ms in self.members.items()}
        groups = []
        for g in nx.lexicographical_topological_sort(self.dag, key=lambda g: lo[g]):
            ms = sorted(self.members[g], key=lambda n: self.idx[n.uid])
            if all(n.op is Op.RESHAPE for n in ms) and all(n.inputs[0].op is not Op.CONST for n in ms):
                continue  # a view of another buffer, not a kernel
            groups.append(ms)
        return groups


def fused_grouping(graph: Graph, library_op: Callable[[Node], bool] | None = None,
                   runtime_ops: frozenset = RUNTIME_OPS) -> list[list[Node]]:
    """The fused partition of a graph's computing nodes, in a valid execution order.

    Nodes for which `library_op(node)` holds will be one library call each (the CPU's GEMMs and
    attention): their kernel holds only the node (and a W^T a GEMM reads transposed), and what would
    have been their prologue and epilogue fuses with the neighbouring kernels instead (a QKV
    bias into the attention kernel's loads, bias + GELU into one elementwise kernel).
    `runtime_ops`: ops that stay alone likewise; a backend that splits their operand layouts
    out itself (CUDA: backends/cuda/routes.py) passes fewer and groups them as anchors."""
    return _Partition(graph, library_op, runtime_ops).run()


def ancestors_within(group: list[Node], roots: set[int]) -> set[int]:
    """uids of the group's nodes that the `roots` depend on (inside the group, roots excluded)."""
    by_uid = {n.uid: n for n in group}
    seen: set[int] = set()
    stack = [by_uid[r] for r in roots]
    while stack:
        n = stack.pop()
        for i in n.inputs:
            if i.uid in by_uid and i.uid not in seen and i.uid not in roots:
                seen.add(i.uid)
                stack.append(by_uid[i.uid])
    return seen


def _is_view_group(nodes: list[Node]) -> bool:
    return all(n.op is Op.RESHAPE and n.inputs[0].op is not Op.CONST for n in nodes)


def is_transposed_2d(w: Node) -> bool:
    """w = PERMUTE(x [N, K], (1, 0)): a GEMM can read x transposed (trans_b) instead of a copy
    (a tied embedding used as the LM head is stored once, [vocab, hidden])."""
    return w.op is Op.PERMUTE and tuple(w.attrs.perm) == (1, 0) and len(w.inputs[0].shape) == 2


def join_weight_transposes(graph: Graph, groups: list[list[Node]]) -> list[list[Node]]:
    """A lone W^T kernel whose only user is one MATMUL joins that GEMM's group, so a library
    GEMM reads W with trans_b rather than a transposed copy made every call."""
    groups = [list(g) for g in groups]
    users = graph.users()
    outputs = {o.uid for o in graph.outputs}
    owner = {n.uid: gi for gi, g in enumerate(groups) for n in g}
    for gi, g in enumerate(groups):
        for m in [n for n in g if n.op is Op.MATMUL]:
            w = m.inputs[1]
            wg = owner.get(w.uid)
            if (wg is not None and wg != gi and groups[wg] == [w] and is_transposed_2d(w)
                    and [u.uid for u in users.get(w.uid, [])] == [m.uid] and w.uid not in outputs):
                groups[gi] = [w] + groups[gi]
                groups[wg] = []
    return [g for g in groups if g]


def split_out_cores(groups: list[list[Node]],
                    core_of: Callable[[list[Node], set[int]], "set[int] | None"]) -> list[list[Node]]:
    """Split every group for which `core_of(group, member uids)` names a core (nodes that one
    library call computes: a BLAS or cuBLASLt GEMM, flash attention) into three kernels in
    execution order: the nodes the core depends on, the core, and the rest. A part other than
    the core that is only reshapes becomes a view, not a kernel."""
    out: list[list[Node]] = []
    for group in (g for g in groups if g):
        core = core_of(group, {n.uid for n in group})
        if core is None:
            out.append(group)
            continue
        pre = ancestors_within(group, core)
        parts = ([n for n in group if n.uid in pre], [n for n in group if n.uid in core],
                 [n for n in group if n.uid not in core and n.uid not in pre])
        for i, part in enumerate(parts):
            if part and not (i != 1 and _is_view_group(part)):
                out.append(part)
    return out


def anchor_of(group: list[Node]) -> Op | None:
    heavy = [n.op for n in group if n.op in HEAVY]
    return heavy[-1] if heavy else None


def grouping_stats(groups: list[list[Node]]) -> dict:
    by_anchor: Counter = Counter(a.name.lower() if (a := anchor_of(g)) else "elementwise" for g in groups)
    return {"kernels": len(groups), "kernels_per_layer": kernels_per_layer(groups), "by_anchor": dict(by_anchor)}


def condensed_graph(graph: Graph, groups: list[list[Node]]) -> nx.DiGraph:
    """The kernel graph of a partition (for checks): an edge where one kernel reads another's node."""
    owner = {n.uid: gi for gi, g in enumerate(groups) for n in g}
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(groups)))
    for gi, g in enumerate(groups):
        for n in g:
            for i in n.inputs:
                src = i
                while src.uid not in owner and src.op is Op.RESHAPE:  # views read their source
                    src = src.inputs[0]
                if src.uid in owner and owner[src.uid] != gi:
                    dag.add_edge(owner[src.uid], gi)
    return dag
