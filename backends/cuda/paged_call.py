"""The CUDA route of the step function's PAGED_ATTENTION: one llmc_paged_attention call
(backends/cuda/shim/llmc_paged_attention.cu), and what that call computes besides the attention.

A captured causal LM reaches its attention through a small prologue of layout and rotary ops:
q, k and v are head slices of the fused QKV projection's output X, and q and k are rotated
(rotate-half form: `y * cos + concat(-y[..., D/2:], y[..., :D/2]) * sin`). Run as its own TVM
kernel, that prologue is a launch per layer between the QKV GEMV and the attention (about 3 us a
layer of a decode step, and a break in the chain of programmatic dependent launches). When the
whole prologue has that form, `absorb_prologues` moves it into the attention's kernel and
`match_paged` turns the kernel into one call that reads X in place ("packed", layout bit 64) and
rotates q and k as it loads them (`llmc_paged_attention_rope`, given the cos / sin tables).
Anything else keeps the prologue a kernel of its own, as before: the rewrite is an optimisation,
never a correctness requirement.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Node
from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel
from llmc.runtime.engine.kv_codec import CODEC_IDS

PAGED_FUNC = "llmc_paged_attention"  # layout scalar: token-major bits 1-8, codec << 4, 64 packed q | k | v
PAGED_ROPE_FUNC = "llmc_paged_attention_rope"  # the same, then the rotary tables cos, sin
PAGED_HEAD_DIMS = frozenset({32, 64, 128})
PAGED_DTYPES = frozenset({DType.F16, DType.BF16})
BSHD = (0, 2, 1, 3)
PACKED = 64


def is_bshd_permute(n: Node) -> bool:
    """n swaps a [B, S, H, D] tensor's S and H axes (or back)."""
    return n.op is Op.PERMUTE and tuple(n.attrs.perm) == BSHD


def _last_axis(n: Node) -> int:
    return n.attrs.axis % len(n.shape)


@dataclass(frozen=True)
class HeadSlice:
    """x = PERMUTE_BSHD(RESHAPE(SLICE(X, last axis, start:end))): heads read in place from X."""

    qkv: Node
    start: object
    end: object
    nodes: tuple[Node, ...]


def head_slice(x: Node) -> HeadSlice | None:
    if not is_bshd_permute(x) or x.inputs[0].op is not Op.RESHAPE:
        return None
    r = x.inputs[0]
    sl = r.inputs[0]
    if sl.op is not Op.SLICE or len(sl.shape) != 3 or _last_axis(sl) != 2 or sl.attrs.step != 1:
        return None
    if len(r.shape) != 4 or tuple(r.shape[:2]) != tuple(sl.shape[:2]):
        return None
    return HeadSlice(sl.inputs[0], sl.attrs.start, sl.attrs.end, (x, r, sl))


@dataclass(frozen=True)
class Rotary:
    """n = y * cos + rotate_half(y) * sin over y's last axis, cos / sin [..., T, D] tables."""

    y: Node
    cos: Node
    sin: Node
    nodes: tuple[Node, ...]


def _rotate_half_of(cat: Node) -> Node | None:
    """y when cat = CONCAT(NEG(y[..., D/2:]), y[..., :D/2]) over the last axis."""
    if cat.op is not Op.CONCAT or len(cat.inputs) != 2 or _last_axis(cat) != len(cat.shape) - 1:
        return None
    neg, lo = cat.inputs
    if neg.op is not Op.NEG or neg.inputs[0].op is not Op.SLICE or lo.op is not Op.SLICE:
        return None
    hi = neg.inputs[0]
    y = lo.inputs[0]
    if hi.inputs[0] is not y:
        return None
    d = y.shape[-1]
    if not isinstance(d, int) or d % 2:
        return None
    for sl, (start, end) in ((hi, (d // 2, d)), (lo, (0, d // 2))):
        if _last_axis(sl) != len(y.shape) - 1 or sl.attrs.step != 1 or sl.attrs.start != start \
                or min(sl.attrs.end, d) != end:
            return None
    return y


def _table(t: Node, y: Node) -> bool:
    """t broadcasts over y's heads as a [T, D] table: shape (1, ..., 1, T, D)."""
    if len(t.shape) < 2 or tuple(t.shape[-2:]) != tuple(y.shape[-2:]) or any(d != 1 for d in t.shape[:-2]):
        return False
    return t.dtype in (y.dtype, DType.F32)


def rotary(n: Node) -> Rotary | None:
    if n.op is not Op.ADD or any(m.op is not Op.MUL for m in n.inputs):
        return None
    for mc, ms in (n.inputs, n.inputs[::-1]):
        for cat, sin in (ms.inputs, ms.inputs[::-1]):
            y = _rotate_half_of(cat)
            if y is None or y not in mc.inputs or len(mc.inputs) != 2:
                continue
            cos = mc.inputs[1] if mc.inputs[0] is y else mc.inputs[0]
            if cos is y or not _table(cos, y) or not _table(sin, y) or sin.dtype is not cos.dtype:
                continue
            if n.dtype is not y.dtype or tuple(n.shape) != tuple(y.shape):
                continue
            neg, lo = cat.inputs
            return Rotary(y, cos, sin, (n, mc, ms, cat, neg, neg.inputs[0], lo))
    return None


@dataclass(frozen=True)
class Prologue:
    """What one packed (and perhaps rotating) paged-attention call computes besides the attention:
    `nodes`, from X (the [1, T, (H + 2 Hkv) D] QKV output) and the rotary tables."""

    qkv: Node
    cos: Node | None
    sin: Node | None
    nodes: tuple[Node, ...]


def packed_source(a: Node, xs) -> Node | None:
    """X when xs (attention a's q, k, v, or the tensors they are rotated from) are head slices of
    one [B, S, (Hq + 2 Hk) D] tensor X, in q | k | v order along its last axis: a call then reads
    X in place, as the fused QKV GEMM wrote it."""
    slices = [head_slice(x) for x in xs]
    if any(s is None for s in slices):
        return None
    X = slices[0].qkv
    d = a.inputs[0].shape[3]
    hq, hk = a.inputs[0].shape[1], a.inputs[1].shape[1]
    if any(s.qkv is not X for s in slices) or len(X.shape) != 3 or not all(isinstance(v, int) for v in (d, hq, hk)):
        return None
    want = [(0, hq * d), (hq * d, (hq + hk) * d), ((hq + hk) * d, (hq + 2 * hk) * d)]
    if [(s.start, s.end) for s in slices] != want or X.shape[2] != (hq + 2 * hk) * d or X.dtype is not a.dtype:
        return None
    return X


def prologue(a: Node) -> Prologue | None:
    """The packed prologue of PAGED_ATTENTION `a` (after prepare_graph: q / k / v are BSHD
    permutes, a rotated one PERMUTE_BSHD(PERMUTE_BSHD(rotary))), or None when it has another form."""
    if a.op is not Op.PAGED_ATTENTION:
        return None
    ys, nodes, rots = [], [], []
    for i, x in enumerate(a.inputs[:3]):
        rot = None
        if i < 2 and is_bshd_permute(x) and is_bshd_permute(x.inputs[0]):
            rot = rotary(x.inputs[0].inputs[0])
            if rot is None:
                return None
            nodes += [x, x.inputs[0], *rot.nodes]
        ys.append(rot.y if rot else x)
        rots.append(rot)
    X = packed_source(a, ys)
    if X is None:
        return None
    if (rots[0] is None) != (rots[1] is None) or rots[0] and (rots[0].cos is not rots[1].cos or rots[0].sin is not rots[1].sin):
        return None  # the call rotates q and k alike, or neither
    nodes += [n for y in ys for n in head_slice(y).nodes]
    return Prologue(X, rots[0].cos if rots[0] else None, rots[0].sin if rots[0] else None, tuple(nodes))


def absorbable(a: Node, group_ids: set[int], users: dict, outputs: set[int]) -> Prologue | None:
    """a's packed prologue where one call may compute it: its nodes feed nothing but each other
    and a (nor a graph output), and a's output head transpose is in a's group (uids `group_ids`),
    since a packed call writes its output token-major."""
    pro = prologue(a)
    if pro is None:
        return None
    inside = {n.uid for n in pro.nodes} | {a.uid}
    if any(n.uid in outputs or any(u.uid not in inside for u in users.get(n.uid, [])) for n in pro.nodes):
        return None
    if not any(is_bshd_permute(u) and u.uid in group_ids for u in users.get(a.uid, [])):
        return None
    return pro


def absorb_prologues(groups: list[list[Node]], users: dict, outputs: set[int]) -> list[list[Node]]:
    """Move each paged attention's packed prologue (see `prologue`) into the attention's group, where
    its nodes feed nothing else; groups left with only reshapes (views) are dropped."""
    from llmc.passes.partition import _is_view_group

    owner = {n.uid: gi for gi, g in enumerate(groups) for n in g}
    for gi, g in enumerate(groups):
        for a in [n for n in g if n.op is Op.PAGED_ATTENTION]:
            pro = absorbable(a, {n.uid for n in g}, users, outputs)
            if pro is None:
                continue
            moved = [n for n in pro.nodes if owner.get(n.uid) != gi]
            ids = {n.uid for n in moved}
            for og in {owner[n.uid] for n in moved if n.uid in owner}:
                groups[og] = [n for n in groups[og] if n.uid not in ids]
            groups[gi] = g = sorted(groups[gi] + moved, key=lambda n: n.uid)  # uids grow along the graph
            for n in moved:
                owner[n.uid] = gi
    return [g for g in groups if g and not (_is_view_group(g) and Op.PAGED_ATTENTION not in {n.op for n in g})]


def match_paged(kernel: Kernel, body: list[Node], idx: dict[int, int]):
    """A PAGED_ATTENTION kernel (with the head transposes of its q/k/v and output, and perhaps its
    packed prologue): one llmc_paged_attention(_rope) call, reading and writing those token-major
    (layout bits 1 q, 2 k, 4 v, 8 out; 64 packed). It has no TVM fallback (the pool is runtime
    state), so what the kernel does not cover is refused here. None when `body` has no paged
    attention. `idx`: call-argument index of each param and output."""
    from llmc.backends.cuda.routes import Route
    from llmc.errors import TargetError

    pas = [n for n in body if n.op is Op.PAGED_ATTENTION]
    if not pas:
        return None
    a = pas[0]
    d = a.shape[-1]
    where = f"paged attention (layer {a.attrs.layer})"
    if a.dtype not in PAGED_DTYPES or d not in PAGED_HEAD_DIMS:
        raise TargetError(f"paged attention on CUDA needs float16/bfloat16 and head dim 32, 64 or 128; layer "
                          f"{a.attrs.layer} is {a.dtype.value} with head dim {d} (compile the model in half precision)")
    inside = {n.uid for n in body}
    used = {a.uid}
    layout = 0
    tensors = []
    tables = []
    pro = prologue(a)
    if pro is not None and all(n.uid in inside for n in pro.nodes) and pro.qkv.uid in idx:
        view = (1, pro.qkv.shape[1], pro.qkv.shape[2] // d, d)
        tensors = [(idx[pro.qkv.uid], view)] * 3
        layout = PACKED | 7
        used |= {n.uid for n in pro.nodes}
        if pro.cos is not None:
            if pro.cos.uid not in idx or pro.sin.uid not in idx:
                raise TargetError(f"{where}: its rotary tables are not kernel arguments")
            tables = [(idx[t.uid], tuple(t.shape[-2:])) for t in (pro.cos, pro.sin)]
    for bit, x in zip((1, 2, 4), a.inputs[:3] if not tensors else ()):
        src = x
        if x.uid in inside:
            if not is_bshd_permute(x):
                raise TargetError(f"{where}: unexpected {x.op.name} in its kernel")
            used.add(x.uid)
            layout |= bit
            src = x.inputs[0]
        if src.uid not in idx:
            raise TargetError(f"{where}: an operand is not a kernel argument")
        tensors.append((idx[src.uid], tuple(src.shape)))
    for x in a.inputs[3:]:
        tensors.append((idx[x.uid], tuple(x.shape)))
    out = kernel.outputs[0] if len(kernel.outputs) == 1 else None
    _, H, T, D = a.shape
    if out is a:
        out_view = tuple(a.shape)
    elif out is not None and is_bshd_permute(out) and out.inputs[0] is a:
        used.add(out.uid)
        layout |= 8
        out_view = tuple(out.shape)
    elif out is not None and out.op is Op.RESHAPE and is_bshd_permute(out.inputs[0]) and out.inputs[0].inputs[0] is a:
        used |= {out.uid, out.inputs[0].uid}
        layout |= 8
        out_view = (1, T, H, D)
    else:
        raise TargetError(f"{where}: its kernel has outputs the shim cannot write")
    if used != inside:
        raise TargetError(f"{where}: its kernel holds ops the shim does not run")
    if layout & PACKED and not layout & 8:
        raise TargetError(f"{where}: a packed q | k | v call writes its output token-major")
    tensors.append((idx[out.uid], out_view))
    codec = 0 if a.attrs.kv_store is None else CODEC_IDS.index(a.attrs.kv_store.value)  # 1 int8, 2 e4m3
    label = f"paged attention (layer {a.attrs.layer}" + (f", window {a.attrs.window}" if a.attrs.window else "") \
        + (f", {CODEC_IDS[codec]} cache" if codec else "") + ")" + (" token-major" if layout & 15 else "") \
        + (" packed-qkv" if layout & PACKED else "") + (" +rotary" if tables else "")
    return Route(PAGED_ROPE_FUNC if tables else PAGED_FUNC, tensors + tables,
                 [float(a.attrs.scale), int(a.attrs.window), layout | codec << 4], label)


__all__ = ["absorb_prologues", "absorbable", "is_bshd_permute", "BSHD", "match_paged", "prologue", "packed_source",
           "rotary", "head_slice", "PAGED_FUNC", "PAGED_ROPE_FUNC"]
