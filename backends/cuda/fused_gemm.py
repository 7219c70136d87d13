"""GEMMs with their decode-time neighbours in one shim call: `llmc_gemm_fused` (shim/llmc_gemv.cu).

At one token a Llama-shaped layer is nine launches, and the three that are not GEMMs or attention
(the RMSNorm before the QKV and gate/up projections, the SwiGLU after gate/up) cost as much as
the small GEMMs' weight reads. So a CUDA build with the shim groups:

    RMS_NORM -> [PERMUTE(W)] MATMUL [+ bias] [+ residual]              (norm joins the GEMM)
    [RMS_NORM ->] [PERMUTE(W)] MATMUL [+ bias] -> SLICE/SILU/SLICE/MUL  (SwiGLU joins it too)

and the shim call computes them in one weight-streaming GEMV for up to 8 rows, or as norm kernel,
cuBLASLt and an elementwise pass for prefill. It needs W stored [N, K] (read through a (1, 0)
permute: passes/gemm_weight_layout.py does that for CUDA's half-precision weights), so each
weight row is one output channel's contiguous dot product.

`fuse_gemm_neighbours(graph, groups)` merges the groups (after `split_out_cores`);
`match_fused_gemm(kernel)` is the route of a merged kernel. The grouping asks the same
structural questions as the route (`_glu_tail`, `_weight_rows`), so a merged group always has
its shim call and never needs a TVM schedule for a norm fused with a GEMM.
"""
from __future__ import annotations

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, Node
from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel

FUSED_FUNC = "llmc_gemm_fused"
QFUSED_FUNC = "llmc_qgemv_fused"  # (shim/llmc_qgemv.cu)
FUSED_DTYPES = frozenset({DType.F16, DType.BF16})


def _weight_rows(mm: Node) -> Node | None:
    """The [N, K] WEIGHT a MATMUL reads through a (1, 0) permute (W^T), else None."""
    b = mm.inputs[1]
    if b.op is not Op.PERMUTE or tuple(b.attrs.perm) != (1, 0):
        return None
    w = b.inputs[0]  # (a 2:4-pruned weight keeps its cuSPARSELt route)
    return w if w.op is Op.WEIGHT and len(w.shape) == 2 and not w.attrs.sparse24 else None


def _gemm_ok(mm: Node) -> bool:
    a = mm.inputs[0]
    k = a.shape[-1] if len(a.shape) >= 2 else None
    w = _weight_rows(mm)
    return (mm.op is Op.MATMUL and mm.dtype in FUSED_DTYPES and a.dtype is mm.dtype and len(a.shape) >= 2
            and w is not None and w.dtype is mm.dtype and isinstance(k, int) and k % 8 == 0)


def _qmatmul_ok(mm: Node) -> bool:
    """A weight-only int4 / int8 QMATMUL in half precision (llmc_qgemv_fused's; check_qmatmul has
    checked K and the group when the core was split out)."""
    return (mm.op is Op.QMATMUL and not mm.attrs.act_bits and mm.dtype in FUSED_DTYPES and len(mm.inputs[0].shape) >= 2
            and all(i.dtype is mm.dtype for i in (mm.inputs[0], *mm.inputs[2:])))


def _norm_ok(n: Node, mm: Node) -> bool:
    """An RMS_NORM over the last axis with a [K] weight of the GEMM's dtype, feeding mm's A."""
    if n.op is not Op.RMS_NORM or mm.inputs[0] is not n or n.dtype is not mm.dtype:
        return False
    x, w = n.inputs[:2]
    return x.dtype is n.dtype and w.dtype is n.dtype and len(w.shape) == 1 and w.shape[0] == x.shape[-1]


def _is_half_slice(s: Node, h: Node, first: bool) -> bool:
    n = h.shape[-1]
    if s.op is not Op.SLICE or s.inputs[0] is not h or not isinstance(n, int) or n % 2:
        return False
    at = s.attrs
    last = at.axis in (-1, len(h.shape) - 1)
    return last and at.step == 1 and (at.start, at.end) == ((0, n // 2) if first else (n // 2, n))


def _glu_tail(h: Node, users: dict) -> list[Node] | None:
    """[gate slice, SILU, up slice, MUL] when h's only readers split it in halves along the last axis
    and the result is silu(first half) * second half, each node read by the next alone."""
    us = users.get(h.uid, [])
    if len(us) != 2:
        return None
    gate = next((s for s in us if _is_half_slice(s, h, True)), None)
    up = next((s for s in us if _is_half_slice(s, h, False)), None)
    if gate is None or up is None:
        return None
    after_gate = users.get(gate.uid, [])
    if len(after_gate) != 1 or after_gate[0].op is not Op.SILU:
        return None
    silu = after_gate[0]
    mul = users.get(silu.uid, [])
    if len(mul) != 1 or mul[0].op is not Op.MUL or {i.uid for i in mul[0].inputs} != {silu.uid, up.uid}:
        return None
    if [u.uid for u in users.get(up.uid, [])] != [mul[0].uid]:
        return None
    return [gate, silu, up, mul[0]]


def _core(group: list[Node]) -> tuple[Node, Node | None, Node | None] | None:
    """(matmul, bias add, residual add) when `group` (CONSTs aside) is [PERMUTE(W)] MATMUL [bias] [residual]
    as backends/cuda/routes.py's GEMM core forms it, with the W^T layout, or a weight-only
    QMATMUL [residual]."""
    body = [n for n in group if n.op is not Op.CONST]
    mms = [n for n in body if n.op in (Op.MATMUL, Op.QMATMUL)]
    if len(mms) != 1 or not (_gemm_ok(mms[0]) or _qmatmul_ok(mms[0])):
        return None
    mm = mms[0]
    rest = [n for n in body if n is not mm and n is not mm.inputs[1]]
    bias = res = None
    cur = mm
    for n in rest:
        if n.op is not Op.ADD or cur not in n.inputs or tuple(n.shape) != tuple(mm.shape):
            return None
        others = [i for i in n.inputs if i is not cur]
        if len(others) != 1 or others[0].op is Op.CONST:  # a constant would be inside the kernel, not an argument
            return None
        o = others[0]
        if bias is None and res is None and len(o.shape) == 1 and o.shape[0] == mm.shape[-1]:
            bias = n
        elif res is None and tuple(o.shape) == tuple(mm.shape):
            res = n
        else:
            return None
        cur = n
    if bias is not None and mm.op is Op.QMATMUL:  # (the quantized core takes a residual only)
        return None
    return mm, bias, res


def fuse_gemm_neighbours(graph: Graph, groups: list[list[Node]]) -> list[list[Node]]:
    """Each W^T GEMM core group takes the lone RMS_NORM group that feeds it alone and, without a
    residual, the SwiGLU group that reads it alone (module doc). Pure: new lists."""
    users = graph.users()
    outs = {o.uid for o in graph.outputs}
    groups = [list(g) for g in groups]
    owner = {n.uid: gi for gi, g in enumerate(groups) for n in g}

    def lone(n: Node) -> int | None:  # the index of a group that is n alone (CONSTs aside)
        gi = owner.get(n.uid)
        if gi is None or [m for m in groups[gi] if m.op is not Op.CONST] != [n]:
            return None
        return gi

    for gi in range(len(groups)):
        core = _core(groups[gi])
        if core is None:
            continue
        mm, bias, res = core
        a = mm.inputs[0]
        ni = lone(a) if _norm_ok(a, mm) and a.uid not in outs and [u.uid for u in users.get(a.uid, [])] == [mm.uid] \
            else None
        if ni is not None and ni < gi:
            groups[gi] = groups[ni] + groups[gi]
            groups[ni] = []
        last = res or bias or mm
        tail = None if res is not None or last.uid in outs else _glu_tail(last, users)
        if tail is not None and not any(t.uid in outs for t in tail[:3]):
            ti = owner.get(tail[0].uid)
            body = [m for m in groups[ti] if m.op is not Op.CONST] if ti is not None else []
            if ti is not None and ti > gi and {m.uid for m in body} == {t.uid for t in tail}:
                groups[gi] = groups[gi] + groups[ti]
                groups[ti] = []
    return [g for g in groups if g]


def match_fused_gemm(kernel: Kernel):
    """The llmc_gemm_fused route of a merged kernel (a norm or a SwiGLU with its GEMM), else None.
    Tensors: x, norm weight or None, W [N, K], bias or None, residual or None, y; scalars glu, eps."""
    body = [n for n in kernel.body if n.op is not Op.CONST]
    norm = body[0] if body and body[0].op is Op.RMS_NORM else None
    rest = body[1:] if norm else body
    tail = [n for n in rest if n.op in (Op.SLICE, Op.SILU, Op.MUL)]
    core = _core([n for n in rest if n not in tail])
    if core is None or len(kernel.outputs) != 1:
        return None
    mm, bias, res = core
    if norm is None and not tail and (mm.op is Op.MATMUL or res is None):  # (routes.py's own GEMM / qgemv routes)
        return None
    if norm is not None and not _norm_ok(norm, mm):
        return None
    last = res or bias or mm
    users: dict = {}
    for n in body:
        for i in n.inputs:
            users.setdefault(i.uid, []).append(n)
    if tail:
        glu = _glu_tail(last, users)
        if res is not None or glu is None or {n.uid for n in glu} != {n.uid for n in tail}:
            return None
        tail = glu  # [gate slice, SILU, up slice, MUL]: the MUL is the output
    out = tail[-1] if tail else last
    if kernel.outputs[0] is not out:
        return None
    from .routes import Route, _arg_index  # (routes imports this module)

    idx = _arg_index(kernel)
    x = norm.inputs[0] if norm else mm.inputs[0]
    ws = list(mm.inputs[1:]) if mm.op is Op.QMATMUL else [_weight_rows(mm)]  # qweight, scales[, zeros] | W
    ins = [x, *ws] + ([norm.inputs[1]] if norm else [])
    if any(i.uid not in idx for i in ins):
        return None

    def other(add: Node | None, of: Node):
        if add is None:
            return None
        (o,) = [i for i in add.inputs if i is not of]
        return (idx[o.uid], tuple(o.shape)) if o.uid in idx else False

    b = other(bias, mm)
    r = other(res, bias or mm)
    if b is False or r is False:
        return None
    arg = lambda n: (idx[n.uid], tuple(n.shape))  # noqa: E731
    g = None if norm is None else arg(norm.inputs[1])
    eps = float(norm.attrs.eps) if norm else 0.0
    epilogue = (" +bias" if b else "") + (" +swiglu" if tail else "") + (" +residual" if r else "")
    if mm.op is Op.QMATMUL:
        at = mm.attrs
        zeros = arg(ws[2]) if len(ws) > 2 else None
        return Route(QFUSED_FUNC, [arg(x), g, arg(ws[0]), arg(ws[1]), zeros, r, arg(out)],
                     [int(at.bits), int(at.group), int(bool(tail)), eps],
                     f"int{at.bits} g{at.group} dequantizing gemv" + (" rmsnorm+" if norm else " ") + "W^T" + epilogue
                     + ("" if at.symmetric else " +zeros"))
    return Route(FUSED_FUNC, [arg(x), g, arg(ws[0]), b, r, arg(out)], [int(bool(tail)), eps],
                 "fused gemv/gemm" + (" rmsnorm+" if norm else " ") + "W^T" + epilogue)


__all__ = ["fuse_gemm_neighbours", "match_fused_gemm", "FUSED_FUNC", "QFUSED_FUNC"]
