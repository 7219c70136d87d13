"""derive_step: a causal LM's full-sequence forward -> one step function over a ragged token axis.

The captured graph takes ids [batch, seq] and returns logits [batch, seq, vocab], with no
cache. The step function it becomes serves prefill, decode and mixed batches alike:

    step(tokens [T], positions [T], logit_rows [R], page_table [S, C], kv_lens [S],
         q_starts [S + 1], kv_cache.0 .. kv_cache.{L-1}) -> logits [R, vocab]

The tokens of all S sequences of a step lie on one axis (batch -> 1, seq -> T). That is
only sound where every op other than attention works token by token, so the pass checks
it from the shapes (a reduction, slice, concat or contraction along the token axis, or a
reshape that folds tokens into another dim, is refused with the node named). Then:
- every causal self-attention becomes PAGED_ATTENTION, which writes the step's K/V into
  the sequence's pages of the KV cache and attends over the sequence's whole history; a
  mask is evaluated once at the compiled context length and must be causal or a sliding
  window (Mistral), which the op then applies itself (a bidirectional encoder is refused);
- `arange` over the sequence (position ids, cache_position) becomes the positions input,
  so learned position tables, rotary tables (partial, scaled) and anything else computed
  from positions see each token's true position;
- the rows asked for (by default each sequence's last token) are gathered before the LM
  head, so the step never makes a [T, vocab] matrix.
With `StepSpec.kv_store` the caches hold int8 or fp8 codes and a scale per token and head
(uint8 rows, runtime/engine/kv_codec.py): half (bf16) or a quarter (fp32) of the bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ...compiler import ir
from ...compiler.dtypes import DType
from ...compiler.interpreter import interpret
from ...compiler.ir import Graph, Node, TensorType
from ...compiler.ops import AxisAttrs, CastAttrs, ConstAttrs, Op, PagedAttentionAttrs, ShapeAttrs
from ...compiler.symbolic import SymDim, SymExpr, substitute
from ...errors import LLMCError
from ...runtime.engine.kv_codec import SCALE_BYTES as KV_SCALE_BYTES
from ..report import PassReport
from .tokenwise import check_tokenwise

TOKENS, ROWS, SEQS, PAGE_COLS, PAGES = "tokens", "rows", "seqs", "page_cols", "pages"
MASK_PROBE_MAX = 8192  # masks are evaluated at the context length, up to this many positions


@dataclass(frozen=True)
class StepSpec:
    page_size: int = 16
    max_tokens: int = 512  # tokens in one step (prefill chunks above this are split by the caller)
    max_seqs: int = 64  # sequences in one step
    max_context: int | None = None  # positions per sequence; None: the captured seq bound
    kv_store: DType | None = None  # I8 / F8E4M3: a quantized KV cache (runtime/engine/kv_codec.py); None: float

    def __post_init__(self) -> None:
        for f in ("page_size", "max_tokens", "max_seqs"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise LLMCError(f"step function: {f} must be a positive int, got {getattr(self, f)!r}")
        if self.kv_store not in (None, DType.I8, DType.F8E4M3):
            raise LLMCError(f"step function: a KV cache stores the model's float dtype, int8 or float8_e4m3fn codes, "
                            f"not {self.kv_store}")


def _refuse(n: Node, why: str) -> LLMCError:
    return LLMCError(f"cannot derive a step function: {n.op.name.lower()} at {n.where or '<graph>'}: {why}")


def _subs_attrs(attrs, values: dict):
    if not dataclasses.is_dataclass(attrs):
        return attrs
    changes = {}
    for f in dataclasses.fields(attrs):
        v = getattr(attrs, f.name)
        if isinstance(v, SymExpr):
            changes[f.name] = substitute(v, values)
        elif isinstance(v, tuple) and any(isinstance(x, SymExpr) for x in v):
            changes[f.name] = tuple(substitute(x, values) if isinstance(x, SymExpr) else x for x in v)
    return dataclasses.replace(attrs, **changes) if changes else attrs


def _ids_input(graph: Graph) -> tuple[Node, str, str]:
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise LLMCError(f"cannot derive a step function: expected one input (token ids [batch, seq]) and one output "
                        f"(logits), got inputs {[i.attrs.name for i in graph.inputs]} and {len(graph.outputs)} outputs "
                        f"(capture the causal LM with input_ids only, no attention_mask)")
    ids = graph.inputs[0]
    dims = ids.shape
    if not ids.dtype.is_int or len(dims) != 2 or not all(isinstance(d, SymExpr) and len(d.symbols) == 1 for d in dims):
        raise LLMCError(f"cannot derive a step function: input {ids.attrs.name!r} {ids.type} is not token ids "
                        f"[batch, seq] with both dims dynamic")
    batch, seq = (next(iter(d.symbols)) for d in dims)
    out = graph.outputs[0]
    if len(out.shape) != 3 or out.shape[0] != dims[0] or out.shape[1] != dims[1] or not out.dtype.is_float:
        raise LLMCError(f"cannot derive a step function: output {out.type} is not logits [batch, seq, vocab]")
    return ids, batch, seq


# ---- attention masks -----------------------------------------------------------------
def _depends_on_input(n: Node) -> bool:
    stack, seen = [n], set()
    while stack:
        x = stack.pop()
        if x.op is Op.INPUT:
            return True
        for i in x.inputs:
            if i.uid not in seen:
                seen.add(i.uid)
                stack.append(i)
    return False


def _causal_window(graph: Graph, att: Node, ids: Node, seq: str) -> int:
    """0 for plain causal attention, w for a sliding window of w keys; else refuse."""
    if not att.attrs.has_mask:
        if not att.attrs.causal:
            raise _refuse(att, "attention is bidirectional (an encoder), not causal")
        return 0
    mask = att.inputs[3]
    if _depends_on_input(mask):
        raise _refuse(att, "its mask depends on the input values (padding?); capture with input_ids only")
    n = min(graph.symbols[seq].hi, MASK_PROBE_MAX)
    probe = Graph((ids,), (mask,), graph.params, graph.symbols)
    m = interpret(probe, [np.zeros((1, n), dtype=ids.dtype.numpy)])[0]
    m = np.broadcast_to(m, m.shape[:-2] + (n, n)).reshape(-1, n, n)
    if m.dtype == np.bool_:
        keep = m
    else:
        keep = m == 0
        if not np.all(keep | (m < -1e30) | np.isneginf(m)):
            raise _refuse(att, "its additive mask holds values other than 0 and -inf (a position bias?)")
    if not np.all(keep == keep[0]):
        raise _refuse(att, "its mask differs between heads")
    keep = keep[0]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if att.attrs.causal:
        keep = keep & (j <= i)
    w = int(keep[-1].sum())
    if w == n and np.array_equal(keep, j <= i):
        return 0
    if np.array_equal(keep, (j <= i) & (j > i - w)):
        return w
    raise _refuse(att, f"its mask is neither causal nor a causal sliding window (evaluated at {n} positions)")


# ---- the LM head -----------------------------------------------------------------------
def _lm_head(out: Node, seq: str) -> Node | None:
    """The MATMUL that makes the logits, walking back through token-wise single-path ops."""
    n = out
    while n.op is not Op.MATMUL:
        carriers = [i for i in n.inputs if any(isinstance(d, SymExpr) and seq in d.symbols for d in i.shape)]
        if len(carriers) != 1:
            return None
        n = carriers[0]
    return n


def _descendants(graph: Graph, root: Node) -> set[int]:
    users = graph.users()
    out, stack = {root.uid}, [root]
    while stack:
        for u in users.get(stack.pop().uid, []):
            if u.uid not in out:
                out.add(u.uid)
                stack.append(u)
    return out


def derive_step(graph: Graph, spec: StepSpec = StepSpec()) -> tuple[Graph, PassReport]:
    ids, batch, seq = _ids_input(graph)
    context = spec.max_context or graph.symbols[seq].hi
    if context > graph.symbols[seq].hi:
        raise LLMCError(f"step function: max_context {context} exceeds the captured sequence bound "
                        f"{graph.symbols[seq].hi} (a position table or mask limit)")
    t_sym, r_sym = SymExpr.var(TOKENS), SymExpr.var(ROWS)
    s_sym, c_sym, p_sym = SymExpr.var(SEQS), SymExpr.var(PAGE_COLS), SymExpr.var(PAGES)
    cols = -(-context // spec.page_size)
    symbols = {TOKENS: SymDim(TOKENS, 1, spec.max_tokens), ROWS: SymDim(ROWS, 1, spec.max_seqs),
               SEQS: SymDim(SEQS, 1, spec.max_seqs), PAGE_COLS: SymDim(PAGE_COLS, 1, cols),
               PAGES: SymDim(PAGES, 1, 1 << 24)}
    i64, i32 = DType.I64, DType.I32
    tokens = ir.input_node("tokens", TensorType((t_sym,), i64))
    positions = ir.input_node("positions", TensorType((t_sym,), i64))
    rows = ir.input_node("logit_rows", TensorType((r_sym,), i64))
    table = ir.input_node("page_table", TensorType((s_sym, c_sym), i32))
    lens = ir.input_node("kv_lens", TensorType((s_sym,), i32))
    starts = ir.input_node("q_starts", TensorType((s_sym + 1,), i32))
    caches: list[Node] = []

    head = _lm_head(graph.outputs[0], seq)
    after_head = _descendants(graph, head) if head is not None else set()
    tok_values = {batch: 1, seq: t_sym}
    row_values = {batch: 1, seq: r_sym}
    new: dict[int, Node] = {}
    windows: list[int] = []
    gathers: list[int] = []  # the row gathers: the one place tokens are picked across the axis
    for n in graph.nodes():
        values = row_values if n.uid in after_head else tok_values
        ins = [new[i.uid] for i in n.inputs]
        if n is ids:
            new[n.uid] = ir.node(Op.RESHAPE, [tokens], ShapeAttrs((1, t_sym)), "step.tokens")
            continue
        if n.op in (Op.WEIGHT, Op.CONST):
            new[n.uid] = n
            continue
        if n.op is Op.ARANGE:
            new[n.uid] = _positions(n, values, positions, t_sym)
            continue
        if n.op is Op.ATTENTION:
            w = _causal_window(graph, n, ids, seq)
            q, k, v = ins[:3]
            hkv, d = k.shape[1], k.shape[3]
            row, dtype = (d, k.dtype) if spec.kv_store is None else (d + KV_SCALE_BYTES, DType.U8)
            cache = ir.input_node(f"kv_cache.{len(caches)}", TensorType((p_sym, 2, spec.page_size, hkv, row), dtype))
            attrs = PagedAttentionAttrs(n.attrs.scale, len(caches), w, spec.kv_store)
            caches.append(cache)
            windows.append(w)
            new[n.uid] = ir.node(Op.PAGED_ATTENTION, [q, k, v, cache, table, lens, starts], attrs, n.where)
            continue
        if n is head:
            ins[0] = ir.node(Op.TAKE, [ins[0], rows], AxisAttrs(1), "step.logit_rows")
            gathers.append(ins[0].uid)
        new[n.uid] = ir.node(n.op, ins, _subs_attrs(n.attrs, values), n.where)
    if not caches:
        raise LLMCError("cannot derive a step function: the graph has no attention (is it a causal LM?)")
    out = new[graph.outputs[0].uid]
    if head is None:  # no LM head matmul found: gather the rows of the logits themselves
        out = ir.node(Op.TAKE, [out, rows], AxisAttrs(1), "step.logit_rows")
        gathers.append(out.uid)
    logits = ir.node(Op.RESHAPE, [out], ShapeAttrs((r_sym, out.shape[2])), "step.logits")
    step = Graph((tokens, positions, rows, table, lens, starts, *caches), (logits,), graph.params, symbols,
                 ("logits",)).with_outputs([logits])
    check_tokenwise(step, {TOKENS, ROWS}, frozenset(gathers))
    win = sorted(set(windows))
    store = "" if spec.kv_store is None else f", {spec.kv_store.value} cache"
    lines = [f"{len(caches)} attention -> paged attention (pages of {spec.page_size}{store})",
             f"step over {TOKENS} <= {spec.max_tokens}, {SEQS} <= {spec.max_seqs}, context {context}"]
    if any(win):
        lines.append(f"sliding window {', '.join(map(str, win))}")
    return step, PassReport("derive_step", {"paged_attention": len(caches)}, lines)


def _positions(n: Node, values: dict, positions: Node, t_sym: SymExpr) -> Node:
    start, end = (substitute(x, values) for x in (n.attrs.start, n.attrs.end))
    extent = end - start
    if isinstance(extent, int) and not (isinstance(start, SymExpr) and TOKENS in start.symbols):
        return ir.node(n.op, [], dataclasses.replace(n.attrs, start=start, end=end), n.where)
    if extent != t_sym or n.attrs.step != 1:
        raise _refuse(n, f"a range {start}..{end} step {n.attrs.step} over the sequence is not a position index")
    p: Node = positions
    if start != 0:
        if not isinstance(start, int):
            raise _refuse(n, f"range start {start} depends on the sequence length")
        p = ir.node(Op.ADD, [p, ir.node(Op.CONST, [], ConstAttrs(start, DType.I64))], n.where)
    if n.attrs.dtype is not DType.I64:
        p = ir.node(Op.CAST, [p], CastAttrs(n.attrs.dtype), n.where)
    return p


__all__ = ["derive_step", "StepSpec", "TOKENS", "ROWS", "SEQS", "PAGE_COLS", "PAGES"]
