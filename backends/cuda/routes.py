"""Which kernels of a CUDA build run in the shim (cuBLASLt GEMMs, flash attention), and the
grouping that gives them kernels the shim can run.

passes/partition.py's `fused_grouping` builds kernels for TVM: a MATMUL with its prologue
(casts, slices) and elementwise epilogue, an ATTENTION with its rotary prologue and head
transposes. The shim computes a fixed set of things, so for CUDA:

1. `prepare_graph` rewrites each offloadable ATTENTION so that its q, k and v are read
   token-major: an input `x` [B,H,S,D] that is not already `PERMUTE(y [B,S,H,D])` becomes
   `PERMUTE(PERMUTE(x))`. The rotary kernel then writes y token-major (contiguous), and the
   attention kernel reads it with no transpose copy and writes its output token-major
   [B,S,H*D], which the O projection reads as is.
2. `cuda_grouping` runs `fused_grouping` and splits each group whose anchor the shim can run
   into: the nodes the core depends on (a TVM kernel; none when they are only reshapes,
   which are views), the core (one shim call), and what is left (a TVM kernel).
3. `match_route(kernel)` decides, per built kernel, whether it is exactly a shim call and
   with which arguments; anything else is lowered through TVM, so the shim is an
   optimisation and never a correctness requirement.

Norm kernels: a lone LayerNorm/RMSNorm (fp16/bf16/fp32) runs in the shim's warp-per-row kernel.
GEMM cores: `C = act(A @ W + bias) + residual` with W 2-D ([K, N], the layout llmc's
weights have), bias [N], act GELU(tanh) or ReLU (cuBLASLt epilogues; exact GELU stays a TVM
kernel), residual shaped like C; fp16, bf16 or fp32. Attention cores: fp16/bf16, head dim
16/32/64/128, GQA, causal, optional mask (bool or additive f32), any mix of token-/head-major.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, Node
from llmc.compiler.ops import COLLECTIVES, POINT_TO_POINT, Op, PermuteAttrs
from llmc.compiler.program import Kernel
from llmc.backends.cuda.fused_gemm import fuse_gemm_neighbours, match_fused_gemm
from llmc.backends.cuda.paged_call import BSHD, absorb_prologues, absorbable, match_paged, packed_source
from llmc.backends.cuda.paged_call import is_bshd_permute as _is_bshd_permute
from llmc.passes.partition import is_transposed_2d as _transposed_2d
from llmc.compiler.symbolic import to_json

GEMM_DTYPES = frozenset({DType.F16, DType.BF16, DType.F32})
ATTN_DTYPES = frozenset({DType.F16, DType.BF16})
ATTN_HEAD_DIMS = frozenset({16, 32, 64, 128})
GEMM_FUNC = "llmc_gemm_ex"
ATTN_FUNC = "llmc_attention_ext"
NORM_FUNC = "llmc_norm_ext"
ACT = {Op.GELU: 1, Op.RELU: 2}


def attention_offloadable(a: Node) -> bool:
    if a.op is not Op.ATTENTION or len(a.inputs) < 3:
        return False
    q, k, v = a.inputs[:3]
    if a.dtype not in ATTN_DTYPES or any(x.dtype is not a.dtype or len(x.shape) != 4 for x in (q, k, v)):
        return False
    d = q.shape[3]
    if not (isinstance(d, int) and d in ATTN_HEAD_DIMS and k.shape[3] == d and v.shape[3] == d):
        return False
    if not a.attrs.scale > 0:
        return False
    if len(a.inputs) > 3:
        m = a.inputs[3]
        if len(m.shape) > 4 or m.dtype not in (DType.BOOL, DType.F32):
            return False
    return True


def packed_qkv(a: Node) -> Node | None:
    """X when q, k, v are PERMUTE(RESHAPE(SLICE(X))) of one [B, S, (Hq+2Hk)*D] projection
    output, sliced q | k | v in that order along its last axis: the attention then reads X
    in place (no copies), as a fused QKV GEMM wrote it."""
    return packed_source(a, a.inputs[:3]) if a.op is Op.ATTENTION else None


def prepare_graph(graph: Graph) -> tuple[Graph, int]:
    """Token-major q/k/v for every offloadable ATTENTION (see the module doc); (graph, count)."""
    from llmc.passes.rewrite import substitute

    mapping: dict[int, Node] = {}
    for n in graph.nodes():
        if n.op is Op.PAGED_ATTENTION:  # its kernel reads q/k/v token-major too (any strides)
            ins = list(n.inputs)
            for i in range(3):
                if not _is_bshd_permute(ins[i]):
                    y = ir.node(Op.PERMUTE, [ins[i]], PermuteAttrs(BSHD), ins[i].where)
                    ins[i] = ir.node(Op.PERMUTE, [y], PermuteAttrs(BSHD), ins[i].where)
            if ins != list(n.inputs):
                mapping[n.uid] = ir.node(Op.PAGED_ATTENTION, ins, n.attrs, n.where)
            continue
        if not attention_offloadable(n) or packed_qkv(n) is not None:
            continue
        ins = list(n.inputs)
        changed = False
        for i in range(3):
            x = ins[i]
            if not _is_bshd_permute(x):
                y = ir.node(Op.PERMUTE, [x], PermuteAttrs(BSHD), x.where)
                ins[i] = ir.node(Op.PERMUTE, [y], PermuteAttrs(BSHD), x.where)
                changed = True
        if changed:
            mapping[n.uid] = ir.node(Op.ATTENTION, ins, n.attrs, n.where)
    if not mapping:
        return graph, 0
    return substitute(graph, mapping), len(mapping)


# ---- grouping ---------------------------------------------------------------------------------
class _Split:
    def __init__(self, graph: Graph):
        self.users = graph.users()
        self.outputs = {o.uid for o in graph.outputs}

    def only_user(self, n: Node, members: set[int]) -> Node | None:
        us = {u.uid: u for u in self.users.get(n.uid, [])}
        if n.uid in self.outputs or len(us) != 1:
            return None
        u = next(iter(us.values()))
        return u if u.uid in members else None

    def attention_core(self, a: Node, members: set[int]) -> set[int]:
        core = {a.uid}
        X = packed_qkv(a)
        if X is not None:
            chain = [n for x in a.inputs[:3] for n in (x, x.inputs[0], x.inputs[0].inputs[0])]
            if all(n.uid in members and n.uid not in self.outputs for n in chain) and all(
                    all(u.uid in {c.uid for c in chain} | {a.uid} for u in self.users.get(n.uid, [])) for n in chain):
                core |= {n.uid for n in chain}
        return core | self.head_transposes(a, members)

    def paged_core(self, a: Node, members: set[int]) -> set[int]:
        """PAGED_ATTENTION with the head transposes of its q/k/v and of its output: the shim reads
        and writes those token-major, so they cost no kernel; and the packed (rotating) prologue
        absorb_prologues put beside it (cuda/paged_call.py)."""
        pro = absorbable(a, members, self.users, self.outputs)
        absorbed = {n.uid for n in pro.nodes} if pro is not None else set()
        return {a.uid} | self.head_transposes(a, members) | (absorbed if absorbed <= members else set())

    def head_transposes(self, a: Node, members: set[int]) -> set[int]:
        """The BSHD permutes feeding an attention's q/k/v (read by it alone) and the permute (+ the
        [B, S, H*D] reshape) of its output: what a token-major attention call absorbs."""
        core = set()
        for x in a.inputs[:3]:
            if (_is_bshd_permute(x) and x.uid in members and x.uid not in self.outputs
                    and all(u.uid == a.uid for u in self.users.get(x.uid, []))):
                core.add(x.uid)
        p = self.only_user(a, members)
        if p is not None and _is_bshd_permute(p):
            core.add(p.uid)
            r = self.only_user(p, members)
            if r is not None and r.op is Op.RESHAPE and len(r.shape) == 3 and tuple(r.shape[:2]) == tuple(p.shape[:2]):
                core.add(r.uid)
        return core

    def scale_chain(self, m: Node) -> list[Node] | None:
        """act_scale_chain(m) when its ops feed nothing but each other and m (nor a graph output):
        then one call may compute them with the matmul."""
        chain = act_scale_chain(m)
        if chain is None:
            return None
        inside = {c.uid for c in chain} | {m.uid}
        if any(n.uid in self.outputs or any(u.uid not in inside for u in self.users.get(n.uid, [])) for n in chain):
            return None
        return chain

    def residual_add(self, m: Node, members: set[int], ancestors: set[int]) -> Node | None:
        """m's only user when it is m + r with r of m's shape and dtype computed outside the group
        (or before m in it): the residual a GEMM call adds in its epilogue."""
        u = self.only_user(m, members)
        if u is None or u.op is not Op.ADD or tuple(u.shape) != tuple(m.shape) or u.dtype is not m.dtype:
            return None
        others = [x for x in u.inputs if x.uid != m.uid]
        if len(others) != 1 or tuple(others[0].shape) != tuple(u.shape) or others[0].dtype is not m.dtype:
            return None
        o = others[0]
        return None if o.uid in members and o.uid not in ancestors else u

    def matmul_core(self, m: Node, members: set[int], ancestors: set[int]) -> set[int] | None:
        a, w = m.inputs
        if len(w.shape) != 2 or len(a.shape) < 2 or m.dtype not in GEMM_DTYPES:
            return None
        if a.dtype is not m.dtype or w.dtype is not m.dtype:
            return None
        core = {m.uid}
        if _transposed_2d(w) and w.uid in members and self.only_user(w, members) is m:
            core.add(w.uid)
        cur, bias, act = m, False, False
        n_dim = m.shape[-1]
        while True:
            u = self.only_user(cur, members)
            if u is None or tuple(u.shape) != tuple(cur.shape) or u.dtype is not cur.dtype:
                break
            if u.op is Op.ADD:
                others = [x for x in u.inputs if x.uid != cur.uid]
                if len(others) != 1:
                    break
                o = others[0]
                if o.dtype is not m.dtype or (o.uid in members and o.uid not in ancestors):
                    break
                if not bias and not act and tuple(o.shape[-1:]) == (n_dim,) and all(d == 1 for d in o.shape[:-1]) \
                        and len(o.shape) < len(u.shape):
                    bias = True
                elif tuple(o.shape) == tuple(u.shape):
                    core.add(u.uid)  # a residual ends the chain (cuBLASLt adds it last)
                    break
                else:
                    break
            elif u.op in ACT and not act and (u.op is not Op.GELU or u.attrs.approximate):
                act = True
            else:
                break
            core.add(u.uid)
            cur = u
        return core


def cuda_grouping(graph: Graph, fuse_gemv: bool = False) -> list[list[Node]]:
    """fused_grouping, with each shim-runnable core split out into its own kernel; with `fuse_gemv`,
    W^T GEMMs then take in the norm before them and the SwiGLU after them (cuda/fused_gemm.py)."""
    from llmc.passes.partition import HEAVY, ancestors_within, fused_grouping, join_weight_transposes, split_out_cores

    split = _Split(graph)
    # paged attention: an anchor, its core split below; collectives: kernels of their own (NCCL calls)
    groups = fused_grouping(graph, runtime_ops=COLLECTIVES | POINT_TO_POINT)
    groups = join_weight_transposes(graph, groups)
    owner = {n.uid: gi for gi, g in enumerate(groups) for n in g}
    for gi, g in enumerate(groups):  # X = ADD(GEMM, bias) read in place by attention: bias -> GEMM epilogue
        for a in [n for n in g if n.op is Op.ATTENTION and attention_offloadable(n)]:
            X = packed_qkv(a)
            if X is None or X.op is not Op.ADD or owner.get(X.uid) != gi or X.uid in split.outputs:
                continue
            mm = [x for x in X.inputs if x.op is Op.MATMUL and owner.get(x.uid) not in (None, gi)]
            if len(mm) != 1 or [u.uid for u in split.users.get(mm[0].uid, [])] != [X.uid]:
                continue
            mg = owner[mm[0].uid]
            if not groups[mg] or groups[mg][-1] is not mm[0]:
                continue
            groups[gi] = [n for n in g if n is not X]
            groups[mg] = groups[mg] + [X]
            owner[X.uid] = mg
            g = groups[gi]

    for gi, g in enumerate(groups):  # the paged kernel writes its output token-major itself: take the
        for a in [n for n in g if n.op is Op.PAGED_ATTENTION]:  # head transpose back from the next GEMM's prologue
            chain, cur = [], a
            for want in (lambda n: _is_bshd_permute(n),
                         lambda n: n.op is Op.RESHAPE and len(n.shape) == 3 and tuple(n.shape[:2]) == tuple(cur.shape[:2])):
                us = split.users.get(cur.uid, [])
                if len(us) != 1 or not want(us[0]) or cur.uid in split.outputs or owner.get(us[0].uid) is None:
                    break
                chain.append(us[0])
                cur = us[0]
            for n in chain:
                og = owner[n.uid]
                if og != gi:
                    groups[og] = [m for m in groups[og] if m is not n]
                    groups[gi] = groups[gi] + [n]
                    owner[n.uid] = gi

    groups = absorb_prologues(groups, split.users, split.outputs)  # q / k / v slices and rotary: into the call

    for gi, g in enumerate(groups):  # W8A8 / FP8: the ops of the rows' scales (a reduction, so a group of its
        for m in [n for n in g if n.op is Op.QMATMUL]:  # own, its abs maybe an epilogue elsewhere) join the
            chain = split.scale_chain(m)  # matmul's group, just before it
            if not chain or any(owner.get(n.uid) is None for n in chain):
                continue
            moved = [c for n in chain for c in (*[i for i in n.inputs if i.op is Op.CONST], n)
                     if owner.get(c.uid) is not None]
            ids = {n.uid for n in moved}
            for og in {owner[n.uid] for n in moved}:
                groups[og] = [n for n in groups[og] if n.uid not in ids]
                if all(n.op is Op.CONST for n in groups[og]):
                    groups[og] = []
            at = groups[gi].index(m)
            groups[gi] = groups[gi][:at] + moved + groups[gi][at:]
            g = groups[gi]
            for n in moved:
                owner[n.uid] = gi

    def core_of(group: list[Node], members: set[int]) -> set[int] | None:
        scales = {c.uid for m in group if m.op is Op.QMATMUL for c in (act_scale_chain(m) or ())}
        heavy = [n for n in group if n.op in HEAVY and n.uid not in scales]  # (a row-scale MAX joined above)
        paged = [n for n in group if n.op is Op.PAGED_ATTENTION]
        if paged:
            if len(heavy) != 1:
                raise AssertionError(f"paged attention grouped with other heavy ops: {[n.op for n in heavy]}")
            return split.paged_core(paged[0], members)
        if len(heavy) == 1 and heavy[0].op is Op.ATTENTION and attention_offloadable(heavy[0]):
            return split.attention_core(heavy[0], members)
        if len(heavy) == 1 and heavy[0].op is Op.MATMUL:
            return split.matmul_core(heavy[0], members, ancestors_within(group, {heavy[0].uid}))
        if len(heavy) == 1 and heavy[0].op is Op.QMATMUL:
            m = heavy[0]
            check_qmatmul(m)
            chain = split.scale_chain(m)  # W8A8 / FP8: the rows' scales are computed by the shim call too
            if chain and all(n.uid in members for n in chain):
                core = {m.uid} | {n.uid for n in chain} | {c.uid for n in chain for c in n.inputs
                                                          if c.op is Op.CONST and c.uid in members}
                add = split.residual_add(m, members, ancestors_within(group, {m.uid}))
                return core | ({add.uid} if add is not None else set())  # + a residual, as the bf16 GEMM takes
            if fuse_gemv:  # llmc_qgemv_fused adds a residual too (and takes a norm / SwiGLU: fused_gemm.py)
                add = split.residual_add(m, members, ancestors_within(group, {m.uid}))
                return {m.uid} | ({add.uid} if add is not None else set())
            return {m.uid}  # llmc_qgemv: no epilogues, a kernel of its own
        return None

    groups = split_out_cores(groups, core_of)
    return fuse_gemm_neighbours(graph, groups) if fuse_gemv else groups


# ---- routes of built kernels ------------------------------------------------------------------
@dataclass
class Route:
    """A kernel run as one shim call: func(*tensors, *scalars).

    `tensors`: per shim argument, None (an absent optional tensor) or (call-arg index, view
    shape as manifest JSON dims); call args are the kernel's params then its outputs.
    """

    func: str
    tensors: list = field(default_factory=list)
    scalars: list = field(default_factory=list)
    label: str = ""

    def to_json(self) -> dict:
        return {"route": "shim", "func": self.func, "label": self.label, "scalars": self.scalars,
                "tensors": [None if t is None else {"arg": t[0], "shape": [to_json(d) for d in t[1]]}
                            for t in self.tensors]}


def _body(kernel: Kernel) -> list[Node]:
    return [n for n in kernel.body if n.op is not Op.CONST]


def _arg_index(kernel: Kernel):
    idx = {p.uid: i for i, p in enumerate(kernel.params)}
    for j, o in enumerate(kernel.outputs):
        idx.setdefault(o.uid, len(kernel.params) + j)
    return idx


def _match_gemm(kernel: Kernel) -> Route | None:
    body = _body(kernel)
    trans_b = 0
    if len(body) > 1 and _transposed_2d(body[0]) and body[1].op is Op.MATMUL and body[1].inputs[1] is body[0]:
        trans_b, body = 1, body[1:]
    if not body or body[0].op is not Op.MATMUL or len(kernel.outputs) != 1 or kernel.outputs[0] is not body[-1]:
        return None
    idx = _arg_index(kernel)
    m = body[0]
    a, w = m.inputs
    if trans_b:
        w = w.inputs[0]
    if a.uid not in idx or w.uid not in idx or len(w.shape) != 2 or len(a.shape) < 2:
        return None
    if m.dtype not in GEMM_DTYPES or a.dtype is not m.dtype or w.dtype is not m.dtype:
        return None
    bias = residual = None
    act = 0
    cur = m
    for n in body[1:]:
        if cur not in n.inputs or tuple(n.shape) != tuple(cur.shape) or residual is not None:
            return None
        if n.op is Op.ADD:
            others = [x for x in n.inputs if x is not cur]
            if len(others) != 1 or others[0].uid not in idx or others[0].dtype is not m.dtype:
                return None
            o = others[0]
            if bias is None and not act and tuple(o.shape[-1:]) == (m.shape[-1],) and len(o.shape) < len(n.shape) \
                    and all(d == 1 for d in o.shape[:-1]):
                bias = (idx[o.uid], (m.shape[-1],))
            elif tuple(o.shape) == tuple(n.shape):
                residual = (idx[o.uid], tuple(o.shape))
            else:
                return None
        elif n.op in ACT and not act and (n.op is not Op.GELU or n.attrs.approximate):
            act = ACT[n.op]
        else:
            return None
        cur = n
    out = body[-1]
    tensors = [(idx[a.uid], tuple(a.shape)), (idx[w.uid], tuple(w.shape)), bias, residual,
               (idx[out.uid], tuple(out.shape))]
    if sparse24_routable(w, act, m.dtype):
        return Route(SPARSE24_FUNC, tensors, [trans_b], "cusparselt 2:4 gemm" + (" (W^T)" if trans_b else "")
                     + (" +bias" if bias else "") + (" +residual" if residual else ""))
    label = "cublaslt gemm" + (" (W^T)" if trans_b else "") + (" +bias" if bias else "") + {0: "", 1: " +gelu", 2: " +relu"}[act] \
        + (" +residual" if residual else "")
    return Route(GEMM_FUNC, tensors, [trans_b, act], label)


SPARSE24_FUNC = "llmc_gemm_sparse24"


def sparse24_routable(w: Node, act: int, dtype: DType) -> bool:
    """A matmul cuSPARSELt runs on the sparse tensor cores (llmc_gemm_sparse24): its weight is a
    WEIGHT pruned 2:4 along K (passes/sparsify.py; stored [N, K] or [K, N], cuSPARSELt takes
    either), bfloat16 (cuSPARSELt's plan search failed on float16 on an H100), both dims multiples
    of 32, no activation epilogue. Others stay dense (cuBLASLt)."""
    if not (w.op is Op.WEIGHT and w.attrs.sparse24 and not act and dtype is DType.BF16):
        return False
    return all(isinstance(d, int) and d % 32 == 0 for d in w.shape)


def _match_attention(kernel: Kernel) -> Route | None:
    body = _body(kernel)
    atts = [n for n in body if n.op is Op.ATTENTION]
    if len(atts) != 1 or not attention_offloadable(atts[0]) or len(kernel.outputs) != 1:
        return None
    a = atts[0]
    idx = _arg_index(kernel)
    inside = {n.uid for n in body}
    layout = 0
    tensors = []
    used = {a.uid}
    X = packed_qkv(a)
    if X is not None and X.uid in idx and all(x.uid in inside for x in a.inputs[:3]):
        B_, S_, W = X.shape
        d = a.inputs[0].shape[3]
        view = (B_, S_, W // d, d)
        tensors = [(idx[X.uid], view)] * 3
        layout = 16 | 7
        used |= {n.uid for x in a.inputs[:3] for n in (x, x.inputs[0], x.inputs[0].inputs[0])}
    for bit, x in zip((1, 2, 4), a.inputs[:3] if not tensors else ()):
        if x.uid in inside:
            if not _is_bshd_permute(x) or x.inputs[0].uid not in idx:
                return None
            used.add(x.uid)
            layout |= bit
            src = x.inputs[0]
        else:
            src = x
        if src.uid not in idx:
            return None
        tensors.append((idx[src.uid], tuple(src.shape)))
    mask = None
    if len(a.inputs) > 3:
        mk = a.inputs[3]
        if mk.uid not in idx:
            return None
        mask = (idx[mk.uid], tuple(mk.shape))
    out = kernel.outputs[0]
    B, H, S, D = a.shape
    if out is a:
        out_view = tuple(a.shape)
    elif _is_bshd_permute(out) and out.inputs[0] is a:
        used.add(out.uid)
        layout |= 8
        out_view = tuple(out.shape)
    elif out.op is Op.RESHAPE and _is_bshd_permute(out.inputs[0]) and out.inputs[0].inputs[0] is a \
            and len(out.shape) == 3 and tuple(out.shape[:2]) == (B, S):
        used |= {out.uid, out.inputs[0].uid}
        layout |= 8
        out_view = (B, S, H, D)
    else:
        return None
    if used != inside:
        return None
    tensors += [mask, (idx[out.uid], out_view)]
    label = "flash attention" + (" packed-qkv" if layout & 16 else "") + (" causal" if a.attrs.causal else "") + (" +mask" if mask else "") \
        + (" gqa" if a.inputs[1].shape[1] != H else "")
    return Route(ATTN_FUNC, tensors, [float(a.attrs.scale), int(bool(a.attrs.causal)), layout], label)


def _match_norm(kernel: Kernel) -> Route | None:
    """A lone LAYER_NORM / RMS_NORM over the last axis: one warp per row in the shim (dlight's
    reduction schedules ran these at a third of the memory bandwidth)."""
    body = _body(kernel)
    if len(body) != 1 or body[0].op not in (Op.LAYER_NORM, Op.RMS_NORM) or kernel.outputs != (body[0],):
        return None
    n = body[0]
    idx = _arg_index(kernel)
    x, w = n.inputs[:2]
    b = n.inputs[2] if n.op is Op.LAYER_NORM else None
    ins = [x, w] + ([b] if b is not None else [])
    if n.dtype not in GEMM_DTYPES or any(i.dtype is not n.dtype or i.uid not in idx for i in ins):
        return None
    if len(w.shape) != 1 or w.shape[0] != x.shape[-1] or (b is not None and tuple(b.shape) != tuple(w.shape)):
        return None
    kind = 1 if n.op is Op.RMS_NORM else 0
    return Route(NORM_FUNC, [(idx[x.uid], tuple(x.shape)), (idx[w.uid], tuple(w.shape)),
                             None if b is None else (idx[b.uid], tuple(b.shape)), (idx[n.uid], tuple(n.shape))],
                 [float(n.attrs.eps), kind], f"warp-per-row {'rms' if kind else 'layer'} norm")


QGEMV_FUNC = "llmc_qgemv"
QGEMM_A8_FUNC = "llmc_qgemm_a8"
QMATMUL_DTYPES = frozenset({DType.F16, DType.BF16})


def check_qmatmul(m: Node) -> None:
    """What llmc_qgemv (backends/cuda/shim/llmc_qgemv.cu) covers; the rest is refused at compile
    time (TVM has no CUDA schedule for the packed dequantizing GEMM)."""
    from llmc.errors import TargetError

    at = m.attrs
    k = m.inputs[0].shape[-1]
    per = 32 if at.bits == 4 else 16
    if m.dtype not in QMATMUL_DTYPES or any(i.dtype is not m.dtype for i in (m.inputs[0], *m.inputs[2:])):
        raise TargetError(f"quantized matmul {m.where or m.uid} on CUDA needs float16/bfloat16 activations and scales, "
                          f"got {m.dtype.value} (compile the model in half precision)")
    if at.act_bits:  # llmc_qgemm_a8: cuBLASLt's int8 / float8 GEMMs want 16-byte rows of codes
        n = m.inputs[1].shape[0]
        if not isinstance(k, int) or k % 16 or not isinstance(n, int) or n % 8:
            raise TargetError(f"quantized matmul {m.where or m.uid} on CUDA ({'fp8' if at.float8 else 'w8a8'}): K "
                              f"({k}) must be a multiple of 16 and N ({n}) of 8")
        return
    if not isinstance(k, int) or k % per or at.group % per:
        raise TargetError(f"quantized matmul {m.where or m.uid} on CUDA: K ({k}) and the group ({at.group}) must be "
                          f"multiples of {per} for {at.bits}-bit weights")


def act_scale_chain(m: Node) -> list[Node] | None:
    """The ops the quantize pass puts before a W8A8 / FP8 QMATMUL for its rows' scales
    (passes/quantize.py row_scale_nodes): DIV(MAXIMUM(MAX(ABS(x), last axis, keepdims), floor),
    qmax) over the matmul's own x, in execution order; None for anything else. A kernel holding
    them and the matmul is one llmc_qgemm_a8 call that computes the scales as it quantizes the rows
    (one pass over x instead of a reduction kernel of its own plus the quantizing pass)."""
    if m.op is not Op.QMATMUL or not m.attrs.act_bits or len(m.inputs) < 4:
        return None
    div, x = m.inputs[3], m.inputs[0]
    if div.op is not Op.DIV or div.inputs[1].op is not Op.CONST:
        return None
    mx = div.inputs[0]
    if mx.op is not Op.MAXIMUM or mx.inputs[1].op is not Op.CONST:
        return None
    red = mx.inputs[0]
    if red.op is not Op.MAX or tuple(red.attrs.axes) != (x.type.rank - 1,) or not red.attrs.keepdims:
        return None
    ab = red.inputs[0]
    if ab.op is not Op.ABS or ab.inputs[0] is not x:
        return None
    return [ab, red, mx, div]


def _match_qmatmul(kernel: Kernel) -> Route | None:
    """A lone QMATMUL: one llmc_qgemv call (weight-only) or llmc_qgemm_a8 call (W8A8 / FP8) over x
    viewed as [rows, K]."""
    body = _body(kernel)
    add = body[-1] if len(body) > 1 and body[-1].op is Op.ADD and body[-2].op is Op.QMATMUL else None
    if add is not None:
        body = body[:-1]
    if not body or body[-1].op is not Op.QMATMUL or kernel.outputs != ((add or body[-1]),):
        return None
    m = body[-1]
    chain = act_scale_chain(m) if len(body) > 1 else None
    if len(body) > 1 and (chain is None or [n.uid for n in body[:-1]] != [n.uid for n in chain]):
        return None
    idx = _arg_index(kernel)
    if any(i.uid not in idx for i in (m.inputs[:3] if chain else m.inputs)):
        return None
    residual = None
    if add is not None:
        others = [x for x in add.inputs if x is not m]
        if not m.attrs.act_bits or len(others) != 1 or others[0].uid not in idx \
                or tuple(others[0].shape) != tuple(m.shape):
            return None
        residual = others[0]
    x = m.inputs[0]
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    at = m.attrs
    if at.act_bits:  # W8A8 / FP8: the 4th input is x's row scales [..., 1], computed in the call with the chain
        sx = m.inputs[3]
        tensors = [(idx[x.uid], (rows, x.shape[-1]))] + [(idx[i.uid], tuple(i.shape)) for i in m.inputs[1:3]]
        out = add or m
        tensors += [None if chain else (idx[sx.uid], (rows, 1)),
                    None if residual is None else (idx[residual.uid], (rows, m.shape[-1])),
                    (idx[out.uid], (rows, m.shape[-1]))]
        floor, qmax = (float(chain[2].inputs[1].attrs.value), float(chain[3].inputs[1].attrs.value)) if chain \
            else (0.0, 0.0)
        what = "fp8 e4m3" if at.float8 else "w8a8 int8"
        return Route(QGEMM_A8_FUNC, tensors, [int(at.float8), floor, qmax],
                     f"{what} GEMM (cuBLASLt), activations quantized per row" + (" (scales too)" if chain else "")
                     + (" +residual" if residual is not None else ""))
    zeros = m.inputs[3] if len(m.inputs) > 3 else None
    tensors = [(idx[x.uid], (rows, x.shape[-1]))] + [(idx[i.uid], tuple(i.shape)) for i in m.inputs[1:3]]
    tensors += [None if zeros is None else (idx[zeros.uid], tuple(zeros.shape)), (idx[m.uid], (rows, m.shape[-1]))]
    return Route(QGEMV_FUNC, tensors, [int(at.bits), int(at.group)],
                 f"int{at.bits} g{at.group} dequantizing gemv" + ("" if at.symmetric else " +zeros"))


def match_route(kernel: Kernel) -> Route | None:
    """The shim call that computes `kernel` exactly, or None (then TVM builds it)."""
    return match_paged(kernel, _body(kernel), _arg_index(kernel)) or _match_qmatmul(kernel) or match_fused_gemm(kernel) or _match_gemm(kernel) \
        or _match_attention(kernel) or _match_norm(kernel)


__all__ = ["prepare_graph", "cuda_grouping", "match_route", "Route", "attention_offloadable"]
