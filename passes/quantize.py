"""quantize: matmuls with a weight operand -> Op.QMATMUL over packed integer weights.

Targets are MATMULs whose right operand is a 2-D float WEIGHT [K, N] (or its transpose
PERMUTE(WEIGHT [N, K]), as the frontends make it). Each becomes

    QMATMUL(x, qweight, scales[, zeros])     weights [N, K], layout in compiler/quant_layout.py

with new WEIGHT sources (named after the old weight: `<name>.qweight`, `.scales`,
`.zeros`); the float weight drops out of Graph.params when nothing else reads it. Kept as
they are: the LM head (a matmul whose result reaches a graph output through data movement
only), the most sensitive layer of a language model, unless `quantize_lm_head`; and a
matmul whose weight another op reads too. The exception is a tied embedding with
`quantize_lm_head` (rtn or gptq): its lookups become QTAKE over the same packed table, so
the table is stored once, in int4 / int8, and the embedding reads the codes the head reads.

Methods: rtn, gptq (needs calibration: H = X^T X per target), awq (needs calibration:
mean |x| per channel and sample rows), smoothquant (w8a8 only; max |x| per channel and sample
rows: passes/quant/smooth.py) and qat (the scales a QAT run learned, given as a
passes.quant.learned.LearnedGrid; the codes reproduce the fine-tuned weights exactly). AWQ's and SmoothQuant's 1/s goes into the activation side: folded
into the weight of an RMS/LayerNorm whose only user is this matmul, else a MUL by a new
[K] weight before it (an elementwise op the partition fuses into x's producer).

All checks (group sizes against every target's K) run before any quantization work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..compiler import ir
from ..compiler.dtypes import DType
from ..compiler.ir import Graph, Node
from ..compiler.ops import Op, QMatmulAttrs
from ..compiler.quant_layout import E4M3_MAX, pack_int4
from ..errors import LLMCError
from .quant.scheme import QuantScheme
from .report import PassReport
from .rewrite import substitute

FLOATS = frozenset({DType.F32, DType.F16, DType.BF16, DType.F64})
THROUGH = frozenset({Op.RESHAPE, Op.PERMUTE, Op.SLICE, Op.CAST, Op.EXPAND, Op.TAKE, Op.INDEX, Op.GATHER})


@dataclass(frozen=True)
class Target:
    mm: Node
    weight: Node  # the WEIGHT source
    transposed: bool  # the WEIGHT is [N, K] read through a (1, 0) permute
    takes: tuple[Node, ...] = ()  # embedding lookups of the same table (a tied LM head): become QTAKE

    @property
    def name(self) -> str:
        return self.weight.attrs.name


def _weight_operand(mm: Node) -> tuple[Node, bool] | None:
    w = mm.inputs[1]
    if w.op is Op.WEIGHT and w.type.rank == 2:
        return w, False
    if w.op is Op.PERMUTE and w.attrs.perm == (1, 0) and w.inputs[0].op is Op.WEIGHT and w.inputs[0].type.rank == 2:
        return w.inputs[0], True
    return None


def _reaches_output(n: Node, users, outputs: set[int]) -> bool:
    """Does n flow into a graph output through data movement only (the LM head's logits)?"""
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m.uid in outputs:
            return True
        for u in users.get(m.uid, []):
            if u.op in THROUGH and u.uid not in seen:
                seen.add(u.uid)
                stack.append(u)
    return False


def find_targets(graph: Graph, scheme: QuantScheme, learned=None) -> tuple[list[Target], list[tuple[str, str]]]:
    """(matmuls to quantize, [(where, why kept)] for weight matmuls left as they are).
    With a LearnedGrid (QAT), an LM head whose weight was fake-quantized is quantized too:
    the model was fine-tuned that way."""
    users = graph.users()
    outputs = {o.uid for o in graph.outputs}
    targets, kept = [], []
    for n in graph.nodes():
        if n.op is not Op.MATMUL:
            continue
        wo = _weight_operand(n)
        x = n.inputs[0]
        if wo is None or x.type.rank < 2:
            continue
        w, transposed = wo
        where = n.where or w.attrs.name
        if w.dtype not in FLOATS or x.dtype is not w.dtype:
            kept.append((where, f"{x.dtype.value} x {w.dtype.value}"))
            continue
        readers = [u for u in users.get(w.uid, []) if u is not n and not (transposed and u is n.inputs[1])]
        takes = tuple(u for u in readers if u.op is Op.TAKE and u.attrs.axis == 0 and u.inputs[0] is w)
        if any(u.op not in (Op.PERMUTE, Op.MATMUL) for u in readers if u not in takes) or \
                (takes and not _tied_table_ok(scheme, transposed)):
            kept.append((where, "weight shared with an embedding"))
            continue
        if not scheme.quantize_lm_head and _reaches_output(n, users, outputs) and \
                not (learned is not None and learned.covers(_weight_nk_stored(graph, w, transposed))):
            kept.append((where, "lm_head"))
            continue
        targets.append(Target(n, w, transposed, takes))
    return targets, kept


def _tied_table_ok(scheme: QuantScheme, transposed: bool) -> bool:
    """Can the embedding read the LM head's packed table (QTAKE)? Only when asked to quantize the
    head (embeddings stay float otherwise); the packed rows must be the table's
    rows (the matmul reads W^T), weight-only, and the codes must stand for W itself: AWQ and
    SmoothQuant scale the matmul's input channels, QAT learned codes for the linear alone."""
    return scheme.quantize_lm_head and transposed and not scheme.act_bits and scheme.method in ("rtn", "gptq")


def check_groups(targets: Sequence[Target], scheme: QuantScheme) -> None:
    bad = []
    for t in targets:
        k = int(t.mm.inputs[0].shape[-1])
        g = scheme.group_for(k)
        if k % g or (scheme.bits == 4 and k % 2):
            bad.append(f"{t.mm.where or t.name} (K={k})")
    if bad:
        k_all = [int(t.mm.inputs[0].shape[-1]) for t in targets]
        fits = [g for g in (128, 64, 32) if all(k % g == 0 for k in k_all)]
        hint = f"; --group {fits[0]} divides every K" if fits else ""
        raise LLMCError(f"int4 group size {scheme.group} does not divide the input size K of {len(bad)} matmul(s): "
                        f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}{hint}")


def _weight_nk_stored(graph: Graph, w: Node, transposed: bool) -> np.ndarray:
    """The weight as [N, K] (output-channel major), in its stored dtype."""
    a = np.asarray(graph.params[w.attrs.name])
    return a if transposed else a.T


def _weight_nk(graph: Graph, t: Target) -> np.ndarray:
    """The float weight as [N, K] (output-channel major), float64."""
    return _weight_nk_stored(graph, t.weight, t.transposed).astype(np.float64)


def quantize_weights(graph: Graph, scheme: QuantScheme, calibration: Sequence[np.ndarray] = (),
                     progress: Callable[[str], None] | None = None, learned=None) -> tuple[Graph, PassReport]:
    """The pass itself (see the module docstring); `calibration`: token-id windows [T];
    `learned`: the passes.quant.learned.LearnedGrid of method "qat"."""
    from .quant.awq import awq_scales
    from .quant.calibrate import collect
    from .quant.gptq import gptq
    from .quant.rtn import rtn
    from .quant.smooth import smooth_scales

    if (scheme.method == "qat") != (learned is not None):
        raise LLMCError("method 'qat' takes its scales from llmc.quant.convert: pass quant=<the LearnedGrid it "
                        "returned> (and no LearnedGrid with other methods)")
    targets, kept = find_targets(graph, scheme, learned)
    check_groups(targets, scheme)
    if scheme.needs_calibration and not len(calibration):
        raise LLMCError(f"--method {scheme.method} needs calibration windows (--calib FILE)")
    stats = collect(graph, [t.mm for t in targets], calibration, progress) if scheme.needs_calibration else {}
    params = dict(graph.params)
    mapping: dict[int, Node] = {}
    users = graph.users()
    before = after = 0
    alphas = []
    for i, t in enumerate(targets):
        if progress and scheme.method != "rtn":
            progress(f"quantizing ({scheme.method}) {i + 1}/{len(targets)}: {t.mm.where or t.name}")
        x = t.mm.inputs[0]
        w = _weight_nk(graph, t)
        k = w.shape[1]
        group = scheme.group_for(k)
        sdt = t.weight.dtype.numpy
        inv_s = None
        if scheme.method == "gptq":
            qz = gptq(w, stats[t.mm.uid].hessian, scheme.bits, group, scheme.is_symmetric, sdt, scheme.damp,
                      act_order=scheme.act_order)
        elif scheme.method == "awq":
            a = stats[t.mm.uid]
            s, alpha, qz = awq_scales(w, a.sample_rows(), a.abs_mean, scheme.bits, group, scheme.is_symmetric, sdt)
            alphas.append(alpha)
            inv_s = (1.0 / s).astype(sdt)
        elif scheme.method == "smoothquant":
            a = stats[t.mm.uid]
            s, alpha, qz = smooth_scales(w, a.sample_rows(), a.abs_max, sdt)
            alphas.append(alpha)
            inv_s = (1.0 / s).astype(sdt)
        elif scheme.method == "qat":
            qz = learned.codes_for(_weight_nk_stored(graph, t.weight, t.transposed), t.mm.where or t.name, sdt)
        elif scheme.kind == "fp8":
            qz = _float8_weights(w, sdt)
        else:
            qz = rtn(w, scheme.bits, group, scheme.is_symmetric, sdt)
        q = qz.q if scheme.kind == "fp8" else qz.q.astype(np.int8) if scheme.bits == 8 else pack_int4(qz.q)
        arrays = {"qweight": q, "scales": qz.scales.astype(sdt)}
        if qz.zeros is not None:
            arrays["zeros"] = qz.zeros.astype(sdt)
        nodes = []
        base = _unique(t.name, params, ".qweight")  # a weight two matmuls read is quantized for each
        for suffix, arr in arrays.items():
            name = f"{base}.{suffix}"
            params[name] = arr
            nodes.append(ir.weight_node(name, ir.TensorType(tuple(arr.shape), DType.from_numpy(arr.dtype))))
            after += arr.nbytes
        before += w.size * t.weight.dtype.itemsize
        if inv_s is not None:
            x = _scale_activation(x, inv_s, t, users, params, mapping)
        if scheme.act_bits:
            nodes.append(row_scale_nodes(x, t.mm.where, E4M3_MAX if scheme.kind == "fp8" else 127.0))
        attrs = QMatmulAttrs(scheme.bits, group, scheme.is_symmetric, t.mm.dtype, scheme.act_bits,
                             scheme.kind == "fp8")
        mapping[t.mm.uid] = ir.node(Op.QMATMUL, [x, *nodes], attrs, t.mm.where)
        for take in t.takes:  # the tied embedding reads the same codes: the table is stored once, packed
            tattrs = QMatmulAttrs(scheme.bits, group, scheme.is_symmetric, take.dtype)
            mapping[take.uid] = ir.node(Op.QTAKE, [nodes[0], take.inputs[1], *nodes[1:]], tattrs, take.where)
    out = substitute(graph, mapping, params)
    for t in targets:  # a float weight still read elsewhere stays; with_outputs drops the rest
        if t.name in out.params:
            after += out.params[t.name].nbytes
            before += out.params[t.name].nbytes
    lines = [f"quantized {len(targets)} matmuls ({before / 1e6:.2f} MB -> {after / 1e6:.2f} MB, {scheme.describe()})"]
    if kept:
        lines.append(f"kept {len(kept)} ({', '.join(sorted({why for _, why in kept}))}: "
                     f"{', '.join(w for w, _ in kept[:3])}{' ...' if len(kept) > 3 else ''})")
    if alphas:
        lines.append(f"{scheme.method} alpha mean {np.mean(alphas):.2f}")
    counts = {"quantized": len(targets), "kept": len(kept), "bytes_before": before, "bytes_after": after}
    return out, PassReport("quantize", counts, lines)


def _float8_weights(w: np.ndarray, scale_dtype):
    """FP8 weights: one scale per output channel, max|w_row| / 448 (rounded to its dtype), and the
    e4m3fn bit patterns of w / scale."""
    from ..compiler.quant_layout import float8_codes
    from .quant.rtn import Quantized

    s = (np.maximum(np.abs(w).max(axis=1), 1e-12) / E4M3_MAX).astype(scale_dtype).astype(np.float64)
    return Quantized(float8_codes(w / s[:, None]), s[:, None], None)


def row_scale_nodes(x: Node, where: str, qmax: float = 127.0) -> Node:
    """The activation scales [..., 1] of x's rows for W8A8 / FP8, as ordinary ops
    (compiler/quant_layout.row_scales): max(max|row|, floor) / qmax (127, or e4m3's 448). A
    reduction of its own ahead of the GEMM, which keeps its one."""
    from ..compiler.ops import ConstAttrs, ReduceAttrs
    from ..compiler.quant_layout import ROW_SCALE_FLOOR

    const = lambda v: ir.node(Op.CONST, [], ConstAttrs(v, x.dtype), where)  # noqa: E731
    amax = ir.node(Op.MAX, [ir.node(Op.ABS, [x], None, where)], ReduceAttrs((x.type.rank - 1,), True), where)
    amax = ir.node(Op.MAXIMUM, [amax, const(ROW_SCALE_FLOOR)], None, where)
    return ir.node(Op.DIV, [amax, const(qmax)], None, where)


def _unique(name: str, params, suffix: str = "") -> str:
    k, out = 1, name
    while f"{out}{suffix}" in params:
        out, k = f"{name}.{k}", k + 1
    return out


def _scale_activation(x: Node, inv_s: np.ndarray, t: Target, users, params, mapping) -> Node:
    """x * inv_s for the matmul's input: into a norm's weight where the norm feeds only this
    matmul, else a MUL by a new [K] weight."""
    if x.op in (Op.RMS_NORM, Op.LAYER_NORM) and len(users.get(x.uid, [])) == 1 and x.uid not in mapping \
            and x.inputs[1].op is Op.WEIGHT and len(users.get(x.inputs[1].uid, [])) == 1:
        wn = x.inputs[1]
        name = f"{wn.attrs.name}.awq"
        params[name] = (np.asarray(params[wn.attrs.name]).astype(np.float64) * inv_s).astype(params[wn.attrs.name].dtype)
        ins = list(x.inputs)
        if x.op is Op.LAYER_NORM and ins[2].op is Op.WEIGHT:  # the bias is scaled too
            bname = f"{ins[2].attrs.name}.awq"
            params[bname] = (np.asarray(params[ins[2].attrs.name]).astype(np.float64) * inv_s).astype(
                params[ins[2].attrs.name].dtype)
            ins[2] = ir.weight_node(bname, ins[2].type)
        elif x.op is Op.LAYER_NORM:
            return _mul(x, inv_s, t, params)
        ins[1] = ir.weight_node(name, wn.type)
        new = ir.node(x.op, ins, x.attrs, x.where)
        mapping[x.uid] = new
        return new
    return _mul(x, inv_s, t, params)


def _mul(x: Node, inv_s: np.ndarray, t: Target, params) -> Node:
    name = _unique(f"{t.name}.awq_inv_scale", params)
    params[name] = inv_s.astype(x.dtype.numpy)
    s = ir.weight_node(name, ir.TensorType((len(inv_s),), x.dtype))
    return ir.node(Op.MUL, [x, s], None, t.mm.where)


def quantize(scheme: QuantScheme, calibration: Sequence[np.ndarray] = (),
             progress: Callable[[str], None] | None = None, learned=None):
    """The pass for a pipeline: Graph -> (Graph, PassReport) with the scheme bound."""
    def quantize(graph: Graph) -> tuple[Graph, PassReport]:
        return quantize_weights(graph, scheme, calibration, progress, learned)
    return quantize


__all__ = ["quantize", "quantize_weights", "find_targets", "check_groups", "Target"]
