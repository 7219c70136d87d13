"""TE lowering rules: one function per `Op`, building a te.Tensor from the input te.Tensors.

A rule is `rule(ctx, node, inputs) -> te.Tensor`; `node` gives the attrs and the llmc
types (static dims decide broadcasting), `ctx` converts dims and names stages. All index
arithmetic is int64. Float16/bfloat16 math is done in float32 and rounded once at the end
of each stage; matmul, reductions, softmax, norms and attention accumulate in float32.

Stage names matter to the scheduler (schedule.py): `matmul_acc*`, `attn_*`, and the
`KEEP_PREFIXES` stages that must stay materialised rather than be inlined.
"""
from __future__ import annotations

import collections
import math
from typing import Callable, Sequence

from tvm import te, tirx

from llmc.compiler.dtypes import DType, promote
from llmc.compiler.ir import Node
from llmc.compiler.ops import BINARY, COMPARE, REDUCE, UNARY, Op
from llmc.compiler.symbolic import Dim, SymExpr
from llmc.errors import LLMCError

from . import fastmath as fm

I64 = "int64"
F32 = "float32"
# Stages the inliner leaves alone: they are computed once per row / per tensor on purpose.
KEEP_PREFIXES = ("qmm_deq", "attn_q", "attn_kT", "attn_v", "attn_bias", "attn_exp", "attn_out", "softmax_exp", "rms_inv",
                 "ln_mean", "ln_rstd")
# Elementwise stages too costly to recompute inside a reduction (matmul prologue etc.).
EXPENSIVE_PREFIXES = ("exp", "log", "sqrt", "rsqrt", "tanh", "erf", "sigmoid", "gelu", "silu", "sin", "cos", "pow",
                      "reciprocal")


def c64(v: int) -> tirx.PrimExpr:
    return tirx.IntImm(I64, int(v))


class LowerCtx:
    """Per-kernel state: one int64 tirx.Var per symbol, unique stage names."""

    def __init__(self, symbols: Sequence[str] = ()):
        self.vars: dict[str, tirx.Var] = {s: tirx.Var(s, I64) for s in symbols}
        self._names: collections.Counter = collections.Counter()

    def var(self, name: str) -> tirx.Var:
        if name not in self.vars:
            self.vars[name] = tirx.Var(name, I64)
        return self.vars[name]

    def dim(self, d: Dim) -> tirx.PrimExpr:
        if isinstance(d, int):
            return c64(d)
        if not isinstance(d, SymExpr):
            raise TypeError(f"not a dim: {d!r}")
        total = None
        for mono, coeff in d.terms:
            term = None
            for s in mono:
                term = self.var(s) if term is None else term * self.var(s)
            if term is None:
                term = c64(coeff)
            elif coeff != 1:
                term = term * c64(coeff)
            total = term if total is None else total + term
        return total if total is not None else c64(0)

    def shape(self, dims: Sequence[Dim]) -> list:
        return [self.dim(d) for d in dims]

    def name(self, base: str) -> str:
        n = self._names[base]
        self._names[base] += 1
        return f"{base}_{n}"


# ---- small helpers ---------------------------------------------------------------------
def dt_of(v) -> str:
    """dtype string of a PrimExpr (TVM 0.27 exprs carry it in .ty)."""
    return str(v.ty.dtype)


def _zero() -> tirx.PrimExpr:
    return c64(0)


def is_float(dt: str) -> bool:
    return dt.startswith("float") or dt.startswith("bfloat")


def compute_dtype(dt: str) -> str:
    """Arithmetic dtype for a storage dtype: half floats compute in f32."""
    if dt in ("float16", "bfloat16"):
        return F32
    if dt == "bool":
        return "int8"
    return dt


def float_compute_dtype(dt: str) -> str:
    """Dtype for transcendental math: f32 for floats, f64 for integer inputs."""
    return F32 if dt in ("float16", "bfloat16", F32) else "float64"


def acc_float(dt: str) -> str:
    """Accumulation dtype of softmax and norms: f32, or f64 for f64 tensors (never narrowed)."""
    return "float64" if dt == "float64" else F32


def cast(v: tirx.PrimExpr, dt: str) -> tirx.PrimExpr:
    if dt_of(v) == dt:
        return v
    if dt == "bool":
        return v != tirx.const(0, dt_of(v))
    return v.astype(dt)


def const(value, dt: str) -> tirx.PrimExpr:
    if dt == "bool":
        return tirx.const(bool(value), "bool")
    if is_float(dt):
        return tirx.const(float(value), dt)
    return tirx.const(int(value), dt)


def bcast_index(in_dims: Sequence[Dim], idx: Sequence) -> list:
    """numpy broadcasting: right-align, static-1 dims read index 0."""
    off = len(idx) - len(in_dims)
    return [_zero() if (isinstance(d, int) and d == 1) else idx[off + k] for k, d in enumerate(in_dims)]


def wrap_index(v: tirx.PrimExpr, extent: tirx.PrimExpr) -> tirx.PrimExpr:
    """Integer index as int64 with numpy negative-index wrap."""
    v = cast(v, I64)
    return tirx.Select(v < _zero(), v + extent, v)


def _compute(ctx: LowerCtx, node: Node, fn: Callable, base: str | None = None) -> te.Tensor:
    return te.compute(ctx.shape(node.shape), fn, name=ctx.name(base or node.op.name.lower()))


def _raxis(ctx: LowerCtx, extent: tirx.PrimExpr, name: str) -> tirx.IterVar:
    return te.reduce_axis((_zero(), extent), name=name)


# ---- elementwise -----------------------------------------------------------------------
def _gelu(attrs, x):
    half, one = tirx.const(0.5, dt_of(x)), tirx.const(1.0, dt_of(x))
    if attrs.approximate:
        inner = tirx.const(math.sqrt(2 / math.pi), dt_of(x)) * (x + tirx.const(0.044715, dt_of(x)) * x * x * x)
        return half * x * (one + fm.tanh(inner))
    return half * x * (one + fm.erf(x * tirx.const(1 / math.sqrt(2), dt_of(x))))


# op -> (math on the float compute dtype); applied to float inputs (ints go through f64)
_FLOAT_UNARY: dict[Op, Callable] = {
    Op.EXP: lambda a, x: fm.exp(x),
    Op.LOG: lambda a, x: tirx.log(x),
    Op.SQRT: lambda a, x: tirx.sqrt(x),
    Op.RSQRT: lambda a, x: tirx.const(1.0, dt_of(x)) / tirx.sqrt(x),
    Op.TANH: lambda a, x: fm.tanh(x),
    Op.ERF: lambda a, x: fm.erf(x),
    Op.SIGMOID: lambda a, x: fm.sigmoid(x),
    Op.GELU: _gelu,
    Op.SILU: lambda a, x: x * fm.sigmoid(x),
    Op.SIN: lambda a, x: tirx.sin(x),
    Op.COS: lambda a, x: tirx.cos(x),
    Op.RECIPROCAL: lambda a, x: tirx.const(1.0, dt_of(x)) / x,
}


def _unary_rule(op: Op):
    def rule(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
        (x,) = ins
        idt, odt = str(x.dtype), node.dtype.value
        attrs = node.attrs

        def f(*idx):
            v = x(*idx)
            if op is Op.CAST:
                if odt == "bool":
                    return v != tirx.const(0, dt_of(v))
                if dt_of(v) == "bool":
                    return tirx.Select(v, const(1, odt), const(0, odt))
                return cast(v, odt)
            if op is Op.NOT:
                b = v if dt_of(v) == "bool" else v != tirx.const(0, dt_of(v))
                return cast(tirx.Not(b), odt)
            if op in (Op.NEG, Op.ABS, Op.RELU):
                cd = compute_dtype(idt)
                v = cast(v, cd)
                if op is Op.NEG:
                    r = -v
                elif op is Op.ABS:
                    r = tirx.abs(v)
                else:
                    r = tirx.max(v, tirx.const(0, cd))
                return cast(r, odt)
            cd = float_compute_dtype(idt)
            return cast(_FLOAT_UNARY[op](attrs, cast(v, cd)), odt)

        return _compute(ctx, node, f)

    return rule


def _binary_math(op: Op, a, b, odt: str):
    if op in COMPARE:
        if op in (Op.AND, Op.OR):
            a = a if dt_of(a) == "bool" else a != tirx.const(0, dt_of(a))
            b = b if dt_of(b) == "bool" else b != tirx.const(0, dt_of(b))
            return tirx.And(a, b) if op is Op.AND else tirx.Or(a, b)
        pd = compute_dtype(promote(DType(dt_of(a)), DType(dt_of(b))).value)
        a, b = cast(a, pd), cast(b, pd)
        return {Op.EQ: lambda: a == b, Op.NE: lambda: a != b, Op.LT: lambda: a < b, Op.LE: lambda: a <= b,
                Op.GT: lambda: a > b, Op.GE: lambda: a >= b}[op]()
    cd = compute_dtype(odt)
    a, b = cast(a, cd), cast(b, cd)
    if op is Op.ADD:
        r = a + b
    elif op is Op.SUB:
        r = a - b
    elif op is Op.MUL:
        r = a * b
    elif op is Op.DIV:
        r = a / b if is_float(cd) else tirx.truncdiv(a, b)
    elif op is Op.POW:
        if is_float(cd):
            r = tirx.power(a, b)
        else:
            r = cast(tirx.power(cast(a, "float64"), cast(b, "float64")), cd)
    elif op is Op.MAXIMUM:
        r = tirx.max(a, b)
    elif op is Op.MINIMUM:
        r = tirx.min(a, b)
    else:
        raise NotImplementedError(op)
    return cast(r, odt)


def _binary_rule(op: Op):
    def rule(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
        a, b = ins
        da, db = node.inputs[0].shape, node.inputs[1].shape
        odt = node.dtype.value
        return _compute(ctx, node, lambda *i: _binary_math(op, a(*bcast_index(da, i)), b(*bcast_index(db, i)), odt))

    return rule


def _where(ctx, node, ins):
    c, a, b = ins
    dc, da, db = (x.shape for x in node.inputs)
    odt = node.dtype.value

    def f(*i):
        cond = c(*bcast_index(dc, i))
        cond = cond if dt_of(cond) == "bool" else cond != tirx.const(0, dt_of(cond))
        return tirx.Select(cond, cast(a(*bcast_index(da, i)), odt), cast(b(*bcast_index(db, i)), odt))

    return _compute(ctx, node, f)


# ---- sources ---------------------------------------------------------------------------
def _const(ctx, node, ins):
    v = const(node.attrs.value, node.attrs.dtype.value)
    return te.compute((), lambda: v, name=ctx.name("const"))


def _full(ctx, node, ins):
    v = const(node.attrs.value, node.attrs.dtype.value)
    return _compute(ctx, node, lambda *i: v)


def _arange(ctx, node, ins):
    a = node.attrs
    start = ctx.dim(a.start)
    return _compute(ctx, node, lambda i: cast(start + i * c64(a.step), a.dtype.value))


# ---- reductions ------------------------------------------------------------------------
def _reduce_rule(op: Op):
    def rule(ctx: LowerCtx, node: Node, ins: Sequence[te.Tensor]) -> te.Tensor:
        (x,) = ins
        axes, keep = tuple(node.attrs.axes), node.attrs.keepdims
        ishape = node.inputs[0].shape
        idt, odt = str(x.dtype), node.dtype.value
        if not axes:
            return _compute(ctx, node, lambda *i: cast(x(*i), odt))
        if op in (Op.SUM, Op.MEAN):
            acc = F32 if is_float(idt) and idt != "float64" else ("float64" if op is Op.MEAN else
                                                                    ("int32" if idt == "bool" else idt))
        else:
            acc = compute_dtype(idt)
        rax = {a: _raxis(ctx, ctx.dim(ishape[a]), f"r{a}") for a in axes}

        def src(idx):
            out, j = [], 0
            for a in range(len(ishape)):
                if a in rax:
                    out.append(rax[a].var)
                    if keep:
                        j += 1
                else:
                    out.append(idx[j])
                    j += 1
            return out

        reducer = {Op.SUM: te.sum, Op.MEAN: te.sum, Op.MAX: te.max, Op.MIN: te.min}[op]
        axis_list = [rax[a] for a in axes]
        red = _compute(ctx, node, lambda *i: reducer(cast(x(*src(i)), acc), axis=axis_list), op.name.lower())
        if op is Op.MEAN:
            count = None
            for a in axes:
                count = ctx.dim(ishape[a]) if count is None else count * ctx.dim(ishape[a])
            return _compute(ctx, node, lambda *i: cast(red(*i) / cast(count, acc), odt), "mean_div")
        if acc != odt:
            return _compute(ctx, node, lambda *i: cast(red(*i), odt), op.name.lower() + "_cast")
        return red

    return rule


def _cumsum(ctx, node, ins):
    (x,) = ins
    ax = node.attrs.axis
    idt, odt = str(x.dtype), node.dtype.value
    acc = F32 if is_float(idt) and idt != "float64" else odt
    k = _raxis(ctx, ctx.dim(node.inputs[0].shape[ax]), "k")

    def f(*i):
        src = list(i)
        src[ax] = k.var
        # (te.sum's `where=` is dropped by create_prim_func here, so mask in the body)
        return te.sum(tirx.Select(k.var <= i[ax], cast(x(*src), acc), const(0, acc)), axis=k)

    red = _compute(ctx, node, f, "cumsum")
    if acc != odt:
        return _compute(ctx, node, lambda *i: cast(red(*i), odt), "cumsum_cast")
    return red


LANES = 16  # lane count of the two-level row reductions below


def row_reduce(ctx: LowerCtx, rows: list, extent: Dim, value: Callable, kind: str, name: str) -> te.Tensor:
    """Reduce value(row_index, j) over j < extent for every row ("sum" or "max", f32).

    A symbolic extent is reduced in two levels with no predicate anywhere: LANES partial
    results over the full tiles (a `lanes16_*` stage the scheduler vectorizes), a scalar tail
    over the last extent % LANES elements, then the combination. (rfactor of a predicated
    split is not an option: TVM drops the predicate.) Static extents stay one stage; the
    scheduler rfactors those itself when they are a multiple of the vector width."""
    red = te.sum if kind == "sum" else te.max
    n = ctx.dim(extent)
    if isinstance(extent, int):
        k = _raxis(ctx, n, "k")
        return te.compute(rows, lambda *r: red(value(r, k.var), axis=k), name=ctx.name(name))
    L = c64(LANES)
    full = tirx.floordiv(n, L)
    ko = _raxis(ctx, full, "ko")
    part = te.compute(rows + [L], lambda *ri: red(value(ri[:-1], ko.var * L + ri[-1]), axis=ko),
                      name=ctx.name(f"lanes16_{name}"))
    kt = _raxis(ctx, tirx.floormod(n, L), "kt")
    tail = te.compute(rows, lambda *r: red(value(r, full * L + kt.var), axis=kt), name=ctx.name(f"{name}_tail"))
    kl = _raxis(ctx, L, "kl")
    lanes = te.compute(rows, lambda *r: red(part(*r, kl.var), axis=kl), name=ctx.name(f"{name}_lanes"))
    combine = (lambda u, w: u + w) if kind == "sum" else tirx.max
    return te.compute(rows, lambda *r: combine(lanes(*r), tail(*r)), name=ctx.name(name))


def _softmax(ctx, node, ins):
    (x,) = ins
    ax = node.attrs.axis
    shape = ctx.shape(node.shape)
    rshape = shape[:ax] + shape[ax + 1:]
    odt = node.dtype.value
    acc = acc_float(odt)

    def at(i, kv):  # full index from a row index and a position on the axis
        return list(i[:ax]) + [kv] + list(i[ax:])

    xf = lambda idx: cast(x(*idx), acc)
    mx = row_reduce(ctx, rshape, node.shape[ax], lambda r, j: xf(at(r, j)), "max", "softmax_max")
    # A static axis keeps exp materialised per row (one exp per element); a symbolic one
    # would need a dynamically sized row buffer, allocated per row, so exp is recomputed.
    ename = "softmax_exp" if isinstance(node.shape[ax], int) else "softmax_e"
    e = te.compute(shape, lambda *i: fm.exp(xf(i) - mx(*(i[:ax] + i[ax + 1:]))), name=ctx.name(ename))
    s = row_reduce(ctx, rshape, node.shape[ax], lambda r, j: e(*at(r, j)), "sum", "softmax_sum")
    return te.compute(shape, lambda *i: cast(e(*i) / s(*(i[:ax] + i[ax + 1:])), odt), name=ctx.name("softmax_out"))


# ---- matmul ----------------------------------------------------------------------------
def _flat_index(idx: Sequence, dims: Sequence) -> tirx.PrimExpr:
    lin = None
    for i, d in zip(idx, dims):
        lin = i if lin is None else lin * d + i
    return lin if lin is not None else _zero()


def _unflat_index(lin: tirx.PrimExpr, dims: Sequence) -> list:
    out = []
    for pos in range(len(dims) - 1, -1, -1):
        if pos == 0:
            out.append(lin)
        else:
            out.append(tirx.floormod(lin, dims[pos]))
            lin = tirx.floordiv(lin, dims[pos])
    return out[::-1]


MATMUL_ROW_TILE = 4  # rows of the register tile; the accumulator's M is padded to a multiple
MATMUL_COL_TILE = 16  # the accumulator's N is padded to a multiple (one AVX-512 vector)


def _pad(dim: tirx.PrimExpr, static, tile: int) -> tirx.PrimExpr:
    if isinstance(static, int) and (static % tile == 0 or static < tile):
        return dim
    return tirx.floordiv(dim + c64(tile - 1), c64(tile)) * c64(tile)


def _clamp(i, dim, padded):
    return i if padded.same_as(dim) else tirx.min(i, dim - c64(1))


def _matmul(ctx, node, ins):
    """Batched numpy matmul, accumulating in f32 (int64 for ints).

    The accumulator stage `matmul_acc` has M and N padded to tile multiples (padding
    re-reads the last row / column and is never stored), so the scheduler's register tile
    needs no predicate and LLVM keeps it in registers. With a 2-D right operand (a weight)
    the left operand's batch dims fold into M: the accumulator is 2-D [M, N], one flat row
    range per tile. A `matmul_out` stage restores shape and dtype when they differ."""
    a, b = ins
    sa, sb = node.inputs[0].shape, node.inputs[1].shape
    odt = node.dtype.value
    acc = F32 if is_float(odt) and odt != "float64" else ("float64" if odt == "float64" else I64)
    k = _raxis(ctx, ctx.dim(sa[-1]), "k")
    nb = len(node.shape) - 2
    n_dim = ctx.dim(sb[-1])
    n_pad = _pad(n_dim, sb[-1], MATMUL_COL_TILE)

    if len(sb) == 2 and len(sa) > 2:
        lead = ctx.shape(sa[:-1])
        m_flat = None
        for d in lead:
            m_flat = d if m_flat is None else m_flat * d
        static = 1
        for d in sa[:-1]:
            static = static * d
        m_pad = _pad(m_flat, static, MATMUL_ROW_TILE)
        acc2 = te.compute((m_pad, n_pad), lambda m, n: te.sum(
            cast(a(*(_unflat_index(_clamp(m, m_flat, m_pad), lead) + [k.var])), acc)
            * cast(b(k.var, _clamp(n, n_dim, n_pad)), acc), axis=k), name=ctx.name("matmul_acc"))
        return _compute(ctx, node, lambda *i: cast(acc2(_flat_index(i[:-1], lead), i[-1]), odt), "matmul_out")

    out_shape = ctx.shape(node.shape)
    m_dim = out_shape[nb]
    m_pad = _pad(m_dim, node.shape[nb], MATMUL_ROW_TILE)

    def f(*i):
        bi, m, n = i[:nb], i[nb], i[nb + 1]
        ai = bcast_index(sa[:-2], bi) + [_clamp(m, m_dim, m_pad), k.var]
        bj = bcast_index(sb[:-2], bi) + [k.var, _clamp(n, n_dim, n_pad)]
        return te.sum(cast(a(*ai), acc) * cast(b(*bj), acc), axis=k)

    res = te.compute(out_shape[:nb] + [m_pad, n_pad], f, name=ctx.name("matmul_acc"))
    if acc == odt and m_pad.same_as(m_dim) and n_pad.same_as(n_dim):
        return res
    return _compute(ctx, node, lambda *i: cast(res(*i), odt), "matmul_out")


# ---- data movement ---------------------------------------------------------------------
def _probe(d: Dim) -> int:
    return d if isinstance(d, int) else d.evaluate(collections.defaultdict(lambda: 1009))


def _reshape_groups(src: Sequence[Dim], dst: Sequence[Dim]):
    """Split a reshape into independent groups of (src dims, dst dims) with equal products,
    so the index math stays local (e.g. [b*s, 384] -> [b, s, 12, 32] has no div/mod on b*s)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, go, pi, po = [], [], 1, 1
        while True:
            if (gi or go) and pi == po:
                break
            if i < len(src) and (j >= len(dst) or _probe(pi) <= _probe(po)):
                gi.append(i)
                pi = src[i] * pi
                i += 1
            elif j < len(dst):
                go.append(j)
                po = dst[j] * po
                j += 1
            else:
                return None
        groups.append((gi, go))
    return groups


def _reshape(ctx, node, ins):
    (x,) = ins
    src, dst = list(node.inputs[0].shape), list(node.shape)
    groups = _reshape_groups(src, dst) or [(list(range(len(src))), list(range(len(dst))))]
    sx, sd = ctx.shape(src), ctx.shape(dst)

    def f(*i):
        out = [None] * len(src)
        for gi, go in groups:
            lin = None
            for j in go:
                lin = i[j] if lin is None else lin * sd[j] + i[j]
            if lin is None:
                lin = _zero()
            rem = lin
            for pos in range(len(gi) - 1, -1, -1):
                a = gi[pos]
                if pos == 0:
                    out[a] = rem
                else:
                    out[a] = tirx.floormod(rem, sx[a])
                    rem = tirx.floordiv(rem, sx[a])
        return x(*out)

    return _compute(ctx, node, f)


def _permute(ctx, node, ins):
    (x,) = ins
    perm = node.attrs.perm

    def f(*i):
        src = [None] * len(perm)
        for k, p in enumerate(perm):
            src[p] = i[k]
        return x(*src)

    return _compute(ctx, node, f)


def _expand(ctx, node, ins):
    (x,) = ins
    d = node.inputs[0].shape
    return _compute(ctx, node, lambda *i: x(*bcast_index(d, i)))


def _slice(ctx, node, ins):
    (x,) = ins
    a = node.attrs
    start = ctx.dim(a.start)

    def f(*i):
        src = list(i)
        src[a.axis] = start + i[a.axis] * c64(a.step) if a.step != 1 else start + i[a.axis]
        return x(*src)

    return _compute(ctx, node, f)


def _concat(ctx, node, ins):
    ax = node.attrs.axis
    odt = node.dtype.value
    offsets, total = [], 0
    for n in node.inputs:
        offsets.append(total)
        total = n.shape[ax] + total
    offs = [ctx.dim(o) for o in offsets]

    def f(*i):
        def piece(t):
            src = list(i)
            src[ax] = i[ax] - offs[t] if t else i[ax]
            return cast(ins[t](*src), odt)

        v = piece(len(ins) - 1)
        for t in range(len(ins) - 2, -1, -1):
            v = tirx.if_then_else(i[ax] < offs[t + 1], piece(t), v)
        return v

    return _compute(ctx, node, f)


def _take(ctx, node, ins):
    x, ind = ins
    ax = node.attrs.axis
    r = len(node.inputs[1].shape)
    extent = ctx.dim(node.inputs[0].shape[ax])

    def f(*i):
        iv = wrap_index(ind(*i[ax:ax + r]), extent)
        return x(*(list(i[:ax]) + [iv] + list(i[ax + r:])))

    return _compute(ctx, node, f)


def _index(ctx, node, ins):
    x, idx = ins[0], ins[1:]
    n = len(idx)
    rb = len(node.shape) - (len(node.inputs[0].shape) - n)
    xs = ctx.shape(node.inputs[0].shape)

    def f(*i):
        lead = [wrap_index(t(*bcast_index(node.inputs[1 + k].shape, i[:rb])), xs[k]) for k, t in enumerate(idx)]
        return x(*(lead + list(i[rb:])))

    return _compute(ctx, node, f)


def _gather(ctx, node, ins):
    x, ind = ins
    ax = node.attrs.axis
    extent = ctx.dim(node.inputs[0].shape[ax])

    def f(*i):
        src = list(i)
        src[ax] = wrap_index(ind(*i), extent)
        return x(*src)

    return _compute(ctx, node, f)


# ---- norms -----------------------------------------------------------------------------
def _inv_count(ctx, d: Dim, acc: str = F32):
    return tirx.const(1.0 / d, acc) if isinstance(d, int) else tirx.const(1.0, acc) / cast(ctx.dim(d), acc)


def _layer_norm(ctx, node, ins):
    x, w, b = ins
    shape = ctx.shape(node.shape)
    rows, last = shape[:-1], shape[-1]
    odt = node.dtype.value
    acc = acc_float(odt)
    inv_d = _inv_count(ctx, node.shape[-1], acc)
    eps = tirx.const(node.attrs.eps, acc)
    xf = lambda idx: cast(x(*idx), acc)
    k1, k2 = _raxis(ctx, last, "k"), _raxis(ctx, last, "k")
    s1 = te.compute(rows, lambda *r: te.sum(xf(list(r) + [k1.var]), axis=k1), name=ctx.name("ln_sum"))
    mean = te.compute(rows, lambda *r: s1(*r) * inv_d, name=ctx.name("ln_mean"))

    def sq(r):
        d = xf(list(r) + [k2.var]) - mean(*r)
        return d * d

    s2 = te.compute(rows, lambda *r: te.sum(sq(r), axis=k2), name=ctx.name("ln_var"))
    rstd = te.compute(rows, lambda *r: tirx.const(1.0, acc) / tirx.sqrt(s2(*r) * inv_d + eps), name=ctx.name("ln_rstd"))

    def f(*i):
        r = i[:-1]
        return cast((xf(i) - mean(*r)) * rstd(*r) * cast(w(i[-1]), acc) + cast(b(i[-1]), acc), odt)

    return te.compute(shape, f, name=ctx.name("layer_norm"))


def _rms_norm(ctx, node, ins):
    x, w = ins
    shape = ctx.shape(node.shape)
    rows, last = shape[:-1], shape[-1]
    odt = node.dtype.value
    acc = acc_float(odt)
    inv_d = _inv_count(ctx, node.shape[-1], acc)
    eps = tirx.const(node.attrs.eps, acc)
    xf = lambda idx: cast(x(*idx), acc)
    k = _raxis(ctx, last, "k")

    def sq(r):
        v = xf(list(r) + [k.var])
        return v * v

    ss = te.compute(rows, lambda *r: te.sum(sq(r), axis=k), name=ctx.name("rms_ss"))
    inv = te.compute(rows, lambda *r: tirx.const(1.0, acc) / tirx.sqrt(ss(*r) * inv_d + eps), name=ctx.name("rms_inv"))
    return te.compute(shape, lambda *i: cast(xf(i) * inv(*i[:-1]) * cast(w(i[-1]), acc), odt),
                      name=ctx.name("rms_norm"))


# ---- attention -------------------------------------------------------------------------
def _tree_sum(terms: list):
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


ATTN_KEY_TILE = 16  # keys are padded to a multiple (masked out), so key loops vectorize exactly
ATTN_ROW_CHUNK = 8  # query rows per scheduled chunk (rows are padded to a multiple)


def _attention(ctx, node, ins):
    """softmax(q k^T * scale [+ mask | masked]) v per (batch, head, query row), f32 inside.

    Stages: attn_q (scaled f32 q), attn_kT (k transposed [D, T_pad], once), attn_qk (one
    score row), attn_s (causal/mask/padding applied; inlined), attn_max16/attn_max and
    attn_sum16/attn_sum (two-level row reductions, the first level vectorizes over 16 lanes),
    attn_exp (kept), attn_pv, attn_out. Masked scores are -inf; exp_f32 maps them to exactly 0,
    so a fully masked row has sum 0 and gives zeros (the divisor is then replaced by 1)."""
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else None
    a = node.attrs
    qs_, ks_, vs_ = (n.shape for n in node.inputs[:3])
    B, H, S, D = ctx.shape(qs_)
    Hk, T = ctx.shape(ks_)[1], ctx.shape(ks_)[2]
    Dv = ctx.shape(vs_)[3]
    group = qs_[1] // ks_[1]
    odt = node.dtype.value
    if odt == "float64":  # the kernel computes in f32 (exp_f32 and f32 scores): refuse, never narrow
        raise LLMCError(f"attention in float64 is not supported ({node.where or 'attention'})")
    kvh = (lambda h: h) if group == 1 else (lambda h: tirx.floordiv(h, c64(group)))
    scale = tirx.const(a.scale, F32)
    L = ATTN_KEY_TILE
    padded = not (isinstance(ks_[2], int) and ks_[2] % L == 0)
    T_pad = tirx.floordiv(T + c64(L - 1), c64(L)) * c64(L) if padded else T
    jc = (lambda j: tirx.min(j, T - c64(1))) if padded else (lambda j: j)
    n_tiles = tirx.floordiv(T_pad, c64(L))

    # Query rows are padded to a multiple of ATTN_ROW_CHUNK (padding rows re-read the last
    # query row and are never stored): the scheduler computes the row stages one chunk at a
    # time, and exact chunks keep their row buffers at chunk size.
    if isinstance(qs_[2], int) and qs_[2] % ATTN_ROW_CHUNK == 0:
        S_pad, ic = S, (lambda i: i)
    else:
        S_pad = tirx.floordiv(S + c64(ATTN_ROW_CHUNK - 1), c64(ATTN_ROW_CHUNK)) * c64(ATTN_ROW_CHUNK)
        ic = lambda i: tirx.min(i, S - c64(1))
    qsc = te.compute((B, H, S_pad, D), lambda b, h, i, d: cast(q(b, h, ic(i), d), F32) * scale,
                     name=ctx.name("attn_q"))
    # K transposed and V copied once, padded to T_pad keys (clamped reads; padded keys are
    # masked), so the per-row loops read them contiguously with no index clamping.
    kT = te.compute((B, Hk, D, T_pad), lambda b, h, d, j: cast(k(b, h, jc(j), d), F32), name=ctx.name("attn_kT"))
    vp = te.compute((B, Hk, T_pad, Dv), lambda b, h, j, d: cast(v(b, h, jc(j), d), F32), name=ctx.name("attn_v"))
    # q.k is one FMA per head-dim step: the schedule register-tiles it over the chunk's 8 query
    # rows (8 independent chains sharing each K^T load), which measured 30-40% faster than
    # one row at a time with a 4-term tree (MiniLM and GPT-2 attention shapes). p.v below
    # keeps its 4-key tree: a row-tiled p.v measured slower.
    U = 1
    rd = _raxis(ctx, tirx.floordiv(D, c64(U)) if U > 1 else D, "d")

    def qk_body(b, h, i, j):
        terms = [qsc(b, h, i, rd.var * c64(U) + c64(u)) * kT(b, kvh(h), rd.var * c64(U) + c64(u), j) for u in range(U)]
        return _tree_sum(terms)

    qk = te.compute((B, H, S_pad, T_pad), lambda b, h, i, j: te.sum(qk_body(b, h, i, j), axis=rd),
                    name=ctx.name("attn_qk"))
    neg_inf = tirx.const(float("-inf"), F32)
    zero_f = tirx.const(0.0, F32)
    bias = None
    if mask is not None:  # the mask as an additive f32 bias over T_pad keys (-inf = masked)
        mdims = [1] * (4 - len(node.inputs[3].shape)) + list(node.inputs[3].shape)
        bshape = ctx.shape(mdims[:3]) + [T_pad]

        def bias_fn(*i):
            mi = list(i[4 - len(node.inputs[3].shape):])
            if not (isinstance(mdims[3], int) and mdims[3] == 1):
                mi[-1] = jc(mi[-1])
            else:
                mi[-1] = c64(0)
            mv = mask(*mi)
            val = tirx.Select(mv, zero_f, neg_inf) if dt_of(mv) == "bool" else cast(mv, F32)
            return tirx.Select(i[3] < T, val, neg_inf) if padded else val

        bias = te.compute(bshape, bias_fn, name=ctx.name("attn_bias"))

    def masked(b, h, i, j):
        s = qk(b, h, i, j)
        if bias is not None:
            s = s + bias(*bcast_index(mdims, [b, h, ic(i), j])[:3], j)  # (padding rows: clamp)
        elif padded:
            s = tirx.Select(j < T, s, neg_inf)
        if a.causal:
            s = tirx.Select(j <= i + (T - S), s, neg_inf)
        return s

    sc = te.compute((B, H, S_pad, T_pad), masked, name=ctx.name("attn_s"))
    r1 = _raxis(ctx, n_tiles, "jo")
    mx16 = te.compute((B, H, S_pad, c64(L)), lambda b, h, i, l: te.max(sc(b, h, i, r1.var * c64(L) + l), axis=r1),
                      name=ctx.name("attn_max16"))
    r1b = _raxis(ctx, c64(L), "l")
    mx = te.compute((B, H, S_pad), lambda b, h, i: te.max(mx16(b, h, i, r1b.var), axis=r1b), name=ctx.name("attn_max"))
    e = te.compute((B, H, S_pad, T_pad), lambda b, h, i, j: fm.exp(sc(b, h, i, j) - mx(b, h, i)),
                   name=ctx.name("attn_exp"))
    r2 = _raxis(ctx, n_tiles, "jo")
    z16 = te.compute((B, H, S_pad, c64(L)), lambda b, h, i, l: te.sum(e(b, h, i, r2.var * c64(L) + l), axis=r2),
                     name=ctx.name("attn_sum16"))
    r2b = _raxis(ctx, c64(L), "l")
    z = te.compute((B, H, S_pad), lambda b, h, i: te.sum(z16(b, h, i, r2b.var), axis=r2b), name=ctx.name("attn_sum"))
    r3 = _raxis(ctx, tirx.floordiv(T_pad, c64(4)), "j")  # T_pad is a multiple of 16

    def pv_body(b, h, i, d):
        js = [r3.var * c64(4) + c64(u) for u in range(4)]
        return _tree_sum([e(b, h, i, j) * vp(b, kvh(h), j, d) for j in js])

    pv = te.compute((B, H, S_pad, Dv), lambda b, h, i, d: te.sum(pv_body(b, h, i, d), axis=r3), name=ctx.name("attn_pv"))
    one, zero = tirx.const(1.0, F32), tirx.const(0.0, F32)

    def out(b, h, i, d):
        zz = z(b, h, i)
        return cast(pv(b, h, i, d) / tirx.Select(zz == zero, one, zz), odt)

    return te.compute((B, H, S, Dv), out, name=ctx.name("attn_out"))


TE_RULES: dict[Op, Callable[[LowerCtx, Node, Sequence[te.Tensor]], te.Tensor]] = {
    Op.CONST: _const, Op.FULL: _full, Op.ARANGE: _arange,
    **{op: _unary_rule(op) for op in UNARY},
    **{op: _binary_rule(op) for op in BINARY},
    Op.WHERE: _where,
    **{op: _reduce_rule(op) for op in REDUCE},
    Op.CUMSUM: _cumsum, Op.SOFTMAX: _softmax, Op.MATMUL: _matmul,
    Op.RESHAPE: _reshape, Op.PERMUTE: _permute, Op.EXPAND: _expand, Op.SLICE: _slice, Op.CONCAT: _concat,
    Op.TAKE: _take, Op.INDEX: _index, Op.GATHER: _gather,
    Op.LAYER_NORM: _layer_norm, Op.RMS_NORM: _rms_norm, Op.ATTENTION: _attention,
}

# mixture of experts: TOPK, ROUTED_MATMUL (te_rules_moe.py)
from . import te_rules_moe  # noqa: E402,F401 - adds its rules to TE_RULES (reads the helpers above)
# weight-only quantized matmul: QMATMUL (te_rules_quant.py)
from . import te_rules_quant  # noqa: E402,F401
