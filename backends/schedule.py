"""CPU (llvm) schedules for lowered kernels, with tvm.s_tir.Schedule.

Every kernel first gets its injective stages inlined (except the ones a rule marks to
keep, and costly ones that would be recomputed inside a reduction). Then the first
strategy that applies wins:

- matmul: register-tiled (mt x nt accumulator, nt vectorized), tiles in parallel, the
  epilogue (bias, activation, residual, cast) computed per tile while it is in cache;
- attention: one parallel task per (batch, head, chunk of 8 query rows); score rows, their
  max, exps and sums live in chunk-sized buffers; K is transposed and V copied once (padded
  to 16 keys) so q.k vectorizes over keys and p.v over the value dim;
- rows: norms / softmax / reductions / multi-output chains: every stage computed per row
  under one parallel loop, row reductions split into 16 vector lanes (rfactor), the row's
  inner loops vectorized;
- per block: each remaining block parallel over its outer loops, inner loop vectorized.

A strategy that raises is abandoned and the next one starts from a fresh schedule, so a
kernel shape nobody anticipated is still correct, only slower.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tvm import s_tir, tirx

from .te_rules import ATTN_KEY_TILE, ATTN_ROW_CHUNK, EXPENSIVE_PREFIXES, KEEP_PREFIXES, MATMUL_COL_TILE, MATMUL_ROW_TILE


@dataclass(frozen=True)
class CpuInfo:
    lanes: int = 16  # float32 elements per vector register
    cores: int = 1


def cpu_info(target: dict | None) -> CpuInfo:
    cores = int((target or {}).get("num-cores", os.cpu_count() or 1))
    mcpu = str((target or {}).get("mcpu", ""))
    attrs = " ".join((target or {}).get("mattr", []) or [])
    if not mcpu and not attrs:
        return CpuInfo(4, cores)  # plain x86-64: SSE2
    avx512 = "avx512" in attrs or any(k in mcpu for k in ("skylake-avx512", "cascadelake", "cooperlake", "icelake",
                                                         "tigerlake", "sapphirerapids", "emeraldrapids",
                                                         "graniterapids", "znver4", "znver5", "x86-64-v4",
                                                         "rocketlake", "cannonlake"))
    return CpuInfo(16 if avx512 else 8, cores)


# ---- block helpers -------------------------------------------------------------------------
def _base(name: str) -> str:
    return name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name


def _name(sch, b) -> str:
    return sch.get(b).name_hint


def _is_reduction(sch, b) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(b).iter_vars)


def _n_spatial(sch, b) -> int:
    return sum(1 for iv in sch.get(b).iter_vars if int(iv.iter_type) == 0)


def _top_blocks(sch) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _output_names(sch) -> set[str]:
    return {_name(sch, b) for b in sch.get_output_blocks(sch.get_sblock("root"))}


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def inline_injective(sch) -> None:
    """Inline every injective, non-output stage into its consumers, except KEEP_PREFIXES
    stages and costly ones (EXPENSIVE_PREFIXES) whose consumer is a reduction."""
    outs = _output_names(sch)
    names = [_name(sch, b) for b in _top_blocks(sch)]
    expensive = {n for n in names if _base(n) in EXPENSIVE_PREFIXES}
    for nm in names:
        b = sch.get_sblock(nm)
        if nm in outs or _is_reduction(sch, b) or _base(nm) in KEEP_PREFIXES:
            continue
        consumers = list(sch.get_consumers(b))
        cnames = [_name(sch, c) for c in consumers]
        if nm in expensive and any(_is_reduction(sch, c) or _base(cn) in KEEP_PREFIXES
                                   for c, cn in zip(consumers, cnames)):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - not inlinable (e.g. consumer shape): keep it
            continue
        if nm in expensive:
            expensive.update(cnames)


def _vectorize_last(sch, block, lanes: int, skip: int = 0) -> None:
    """Vectorize the innermost loop of an injective block; `skip` outer loops (the row or
    tile loop a block was computed at) are never it."""
    loops = sch.get_loops(block)
    if len(loops) <= skip:
        return
    ext = _extent(sch, loops[-1])
    if ext is not None and ext < 2:
        return
    if ext is not None and ext <= 4 * lanes and (ext % lanes or ext == lanes):
        sch.vectorize(loops[-1])
    else:  # (a ragged or symbolic extent gets a predicate: LLVM emits AVX-512 masked ops)
        _, inner = sch.split(loops[-1], [None, lanes])
        sch.vectorize(inner)


def _static_size(sch, loops) -> int | None:
    total = 1
    for lp in loops:
        e = _extent(sch, lp)
        if e is None:
            return None
        total *= e
    return total


def _parallel_outer(sch, block, n_outer: int, min_work: int = 2048) -> None:
    loops = sch.get_loops(block)[:n_outer]
    if not loops:
        return
    size = _static_size(sch, sch.get_loops(block))
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if size is None or size >= min_work:
        sch.parallel(fused)


def _schedule_injective(sch, block, info: CpuInfo) -> None:
    """Vectorize the inner loop; parallel over the outer ones (not over the vector loop's
    outer part, which would put a div/mod per vector into the index math)."""
    n = len(sch.get_loops(block))
    _vectorize_last(sch, block, info.lanes)
    if n > 1:
        _parallel_outer(sch, block, n - 1)
    else:
        loops = sch.get_loops(block)
        if len(loops) == 2 or (len(loops) == 1 and _extent(sch, loops[0]) is None):
            _parallel_outer(sch, block, 1)


# ---- strategies ----------------------------------------------------------------------------
def schedule_per_block(sch, info: CpuInfo) -> None:
    for b in _top_blocks(sch):
        if _is_reduction(sch, b):
            ns = _n_spatial(sch, b)
            if ns:
                _parallel_outer(sch, b, ns)
        else:
            _schedule_injective(sch, b, info)


def _rfactor_lanes(sch, block, lanes: int):
    """Split a row reduction's (single, innermost, static) loop into lanes partial results
    (rfactor), so the bulk of it runs as vector ops instead of one latency-bound scalar
    chain. Returns the rfactor block, or None when the shape does not allow it."""
    ivs = sch.get(block).iter_vars
    if sum(1 for iv in ivs if int(iv.iter_type) != 0) != 1:
        return None
    r = sch.get_loops(block)[-1]
    ext = _extent(sch, r)
    if ext is None or ext % lanes or ext < 2 * lanes:
        return None
    _, ki = sch.split(r, [None, lanes])
    return sch.rfactor(ki, factor_axis=_n_spatial(sch, block))


def _binds_reduction(sch, block, loop) -> bool:
    """Whether `loop`'s variable feeds one of `block`'s reduction iterators."""
    var = sch.get(loop).loop_var
    target = sch.get(block)

    def find(stmt):
        if isinstance(stmt, s_tir.SBlockRealize):
            return stmt if stmt.block.same_as(target) else find(stmt.block.body)
        if isinstance(stmt, tirx.SeqStmt):
            return next((r for r in map(find, stmt.seq) if r is not None), None)
        body = getattr(stmt, "body", None)
        return find(body) if body is not None else None

    realize = find(sch.get(loop))
    if realize is None:
        raise ValueError("rfactor block not under its loop")
    return any(int(iv.iter_type) != 0 and any(v.same_as(var) for v in tirx.analysis.undefined_vars(value))
               for iv, value in zip(realize.block.iter_vars, realize.iter_values))


def _vectorize_rfactor(sch, rf, lanes: int) -> None:
    """rf block under its row: loops (.., ko reduce, ki lanes) -> vectorize ki, init vectorized."""
    loops = sch.get_loops(rf)
    ko, ki = loops[-2], loops[-1]
    # compute_at may regenerate the loops lanes-first; tell them apart by what they bind (their
    # extents are equal when the row is lanes * lanes long)
    if _binds_reduction(sch, rf, ki):
        ko, ki = ki, ko
        sch.reorder(ko, ki)
    sch.vectorize(ki)
    init = sch.decompose_reduction(rf, ko)
    _vectorize_last(sch, init, lanes, skip=1)


def schedule_rows(sch, info: CpuInfo) -> None:
    """Every stage computed per row under one parallel row loop. The row loop is the last
    stage's, with the others computed at it; when an earlier stage is itself an output
    (residual add -> norm), outputs cannot move, so the first stage's row loop is used and
    the later stages are computed after it instead."""
    blocks = _top_blocks(sch)
    if _is_reduction(sch, blocks[-1]) or len(blocks) < 2:
        raise ValueError("rows: needs producers and an injective last stage")
    outs = _output_names(sch)
    first_anchored = any(_name(sch, b) in outs for b in blocks[:-1])
    rfs = []
    for b in blocks[:-1]:
        if _is_reduction(sch, b):
            rf = _rfactor_lanes(sch, b, info.lanes)
            if rf is not None:
                rfs.append(_name(sch, rf))
    blocks = _top_blocks(sch)
    anchor = blocks[0] if first_anchored else blocks[-1]
    if _is_reduction(sch, anchor):
        raise ValueError("rows: anchor stage is a reduction")
    loops = sch.get_loops(anchor)
    if len(loops) < 2:
        raise ValueError("rows: anchor stage has no row structure")
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    # every moved stage must be linked to the ones already under the row loop; an unrelated
    # output would otherwise be recomputed whole for every row
    placed = {_name(sch, anchor)}
    if first_anchored:
        for b in blocks[1:]:
            if not {_name(sch, p) for p in sch.get_producers(b)} & placed:
                raise ValueError("rows: a stage does not depend on the row stages")
            sch.reverse_compute_at(b, row, preserve_unit_loops=False)
            placed.add(_name(sch, b))
    else:
        for b in reversed(blocks[:-1]):
            if not {_name(sch, c) for c in sch.get_consumers(b)} & placed:
                raise ValueError("rows: a stage feeds none of the row stages")
            sch.compute_at(b, row, preserve_unit_loops=False)
            placed.add(_name(sch, b))
    sch.parallel(row)
    for nm in rfs:
        _vectorize_rfactor(sch, sch.get_sblock(nm), info.lanes)
    for b in blocks:
        nm = _name(sch, b)
        if nm.startswith("lanes16_"):
            _vectorize_reduction_lanes(sch, b, info.lanes)
        elif nm not in rfs and not _is_reduction(sch, b):
            _vectorize_last(sch, b, info.lanes, skip=1)


def _find(sch, base: str):
    for b in _top_blocks(sch):
        if _base(_name(sch, b)) == base:
            return b
    return None


def _flatten_rows(sch, block) -> None:
    """Re-index an injective block over (flat rows, last dim), so that a tile of flat rows
    is an exact region of it (a box over (b, s) would over-cover a tile that wraps a batch)."""
    ivs = sch.get(block).iter_vars
    if len(ivs) <= 2:
        return
    ext = [iv.dom.extent for iv in ivs]

    def flat(*v):
        lin = v[0]
        for x, e in zip(v[1:-1], ext[1:-1]):
            lin = lin * e + x
        return [lin, v[-1]]

    sch.transform_block_layout(block, tirx.IndexMap.from_func(flat, ndim=len(ivs), index_dtype="int64"))


MATMUL_ROW_BLOCK = 256  # rows per parallel task: the packed B panel is reused over them
MATMUL_K_BLOCK = 256  # K is split only when larger than 2x this


def _b_operand_index(sch, acc) -> int | None:
    """Index (in the accumulator's reads) of the right operand, if it is one plain buffer."""
    blk = sch.get(acc)
    ivs = blk.iter_vars
    kname, nname = str(ivs[-1].var), str(ivs[-2].var)
    reads = list(blk.reads)
    if len(reads) < 2:
        return None
    text = str(reads[-1])
    if re.search(rf"\b{re.escape(kname)}\b", text) and re.search(rf"\b{re.escape(nname)}\b", text):
        return len(reads) - 1
    return None


def _same_extent(a, b) -> bool:
    """Two extents that are the same constant or the same symbol (enough for a fuse check)."""
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return int(a.value) == int(b.value)
    return isinstance(a, tirx.Var) and isinstance(b, tirx.Var) and a.same_as(b)


def _fused_vars(expr, extents: dict) -> list | None:
    """The iteration variables whose row-major fuse `expr` is (v, or f * E_v + v with E_v
    the extent of v, recursively), or None for any other index."""
    if isinstance(expr, tirx.Var):
        return [expr] if expr in extents else None
    if isinstance(expr, tirx.Add) and isinstance(expr.b, tirx.Var) and expr.b in extents \
            and isinstance(expr.a, tirx.Mul):
        if _same_extent(expr.a.b, extents[expr.b]):
            head = _fused_vars(expr.a.a, extents)
            return None if head is None else head + [expr.b]
    return None


def _check_tile_exact(sch, block, tiled: set[str], acc_buf: str, n_batch: int) -> None:
    """Refuse to compute `block` tile by tile unless each tiled buffer it reads maps its
    iteration box onto the tile exactly.

    reverse_compute_at gives the epilogue the bounding box of the points that read the
    tile; for any other index map (a head split: acc[r // 12, r % 12 * 16 + c]) that box
    spills over points of other tiles, which read accumulator values that another
    parallel task has not written yet: a race, silently wrong with more than one thread
    (bloom's and persimmon's QKV projection + head split were). Exact maps: every index a
    distinct iteration variable, except the accumulator's batch indices (one value per
    tile), which may also be a row-major fuse of distinct variables (b * heads + h)."""
    blk = sch.get(block)
    extents = {iv.var: iv.dom.extent for iv in blk.iter_vars}
    for region in blk.reads:
        name = region.source.name
        if name not in tiled:
            continue
        used: list = []
        for d, r in enumerate(region.region):
            single = isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1
            vs = _fused_vars(r.min, extents) if single else None
            if vs is not None and len(vs) > 1 and not (name == acc_buf and d < n_batch):
                vs = None
            if vs is None:
                raise ValueError(f"matmul: epilogue {_name(sch, block)} reads {name} at "
                                 f"{[x.min for x in region.region]}, not a tile-exact region")
            used += vs
        if len(set(map(str, used))) != len(used):  # iteration variable names are unique in a block
            raise ValueError(f"matmul: epilogue {_name(sch, block)} reads {name} with a repeated variable")


def schedule_matmul(sch, info: CpuInfo, mt: int = MATMUL_ROW_TILE, nt: int | None = None,
                    mc: int = MATMUL_ROW_BLOCK, pack_b: bool = True, fuse_epilogue: bool = True) -> None:
    acc = _find(sch, "matmul_acc")
    blocks = _top_blocks(sch)
    names = [_name(sch, b) for b in blocks]
    acc_name = _name(sch, acc)
    if sum(1 for n in names if _base(n) == "matmul_acc") != 1:
        raise ValueError("matmul: expects exactly one matmul")
    pos = names.index(acc_name)
    if any(_is_reduction(sch, b) for i, b in enumerate(blocks) if i != pos):
        raise ValueError("matmul: other reductions in the kernel")
    before = set(names[:pos])  # un-inlined prologue stages stay as they are (per-block)
    epilogue = blocks[pos + 1:]
    b_idx = _b_operand_index(sch, acc) if pack_b else None
    *bl, i, j, k = sch.get_loops(acc)
    n_ext, m_ext, k_ext = _extent(sch, j), _extent(sch, i), _extent(sch, k)
    if nt is None:
        cands = [c for c in (4 * info.lanes, 2 * info.lanes, info.lanes) if n_ext is not None and n_ext % c == 0]
        nt = cands[0] if cands else MATMUL_COL_TILE
    if n_ext is not None and n_ext < nt:
        nt = n_ext
    if m_ext is not None and m_ext < mt:
        mt = m_ext
    io_all, ii = sch.split(i, [None, mt])
    mo, io = sch.split(io_all, [None, max(1, mc // mt)])
    jo, ji = sch.split(j, [None, nt])
    kc = None
    if k_ext is not None and k_ext > 2 * MATMUL_K_BLOCK:
        kc = next((c for c in (MATMUL_K_BLOCK, 192, 128, 64) if k_ext % c == 0), None)
    if kc is not None:
        ko, ki = sch.split(k, [None, kc])
        sch.reorder(*bl, jo, mo, ko, io, ki, ii, ji)
    else:
        ko = k
        sch.reorder(*bl, jo, mo, io, k, ii, ji)
    outer = sch.fuse(*bl, jo, mo)
    flat = not bl
    acc_buf = sch.get(acc).writes[0].source.name
    tiled = {acc_buf}  # buffers computed tile by tile: the accumulator, then the fused epilogues
    for e in epilogue if fuse_epilogue else []:
        if flat:  # the epilogue reads acc[flatten(b, s), n]: flatten its iteration space to match
            _flatten_rows(sch, e)
        _check_tile_exact(sch, e, tiled, acc_buf, len(bl))
        tiled.update(w.source.name for w in sch.get(e).writes)
        sch.reverse_compute_at(e, outer, preserve_unit_loops=False)
        # an epilogue indexed differently (e.g. a head split) gets a symbolic bounding box
        # per tile: wrong work and very slow to compile, so that is left to the next strategy
        if any(_extent(sch, lp) is None for lp in sch.get_loops(e)[1:]):
            raise ValueError("matmul: epilogue region per tile is not exact")
    deq = _find(sch, "qmm_deq")
    if deq is not None:  # a quantized weight: dequantize its [K, nt] panel once per task instead of copying it
        before.discard(_name(sch, deq))
        sch.compute_at(deq, outer, preserve_unit_loops=False)
        _vectorize_last(sch, deq, info.lanes, skip=1)
    elif b_idx is not None:  # copy the B panel [K, nt] contiguous once per task
        bc = sch.cache_read(acc, b_idx, "global")
        sch.compute_at(bc, outer, preserve_unit_loops=False)
        _vectorize_last(sch, bc, info.lanes, skip=1)
    sch.parallel(outer)
    sch.unroll(ii)
    sch.vectorize(ji)
    init = sch.decompose_reduction(acc, ko)
    iloops = sch.get_loops(init)
    if sch.get(iloops[-1]).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(iloops[-1])
    for e in epilogue:
        if fuse_epilogue:
            _vectorize_last(sch, e, info.lanes, skip=1)
        else:
            _schedule_injective(sch, e, info)
    for b in _top_blocks(sch):
        if _name(sch, b) in before and not _is_reduction(sch, b):
            _schedule_injective(sch, b, info)


def _vectorize_reduction_lanes(sch, block, lanes: int) -> None:
    """Block with loops (..., spatial lane l, reduction r): loop r outside, vectorize l."""
    l, r = sch.get_loops(block)[-2:]
    sch.reorder(r, l)
    if _extent(sch, l) is not None:
        sch.vectorize(l)  # (before decompose: the update block alone is not a reduction)
    init = sch.decompose_reduction(block, r)
    _vectorize_last(sch, init, lanes, skip=1)


def schedule_attention(sch, info: CpuInfo) -> None:
    stages = ("attn_q", "attn_qk", "attn_max16", "attn_max", "attn_exp", "attn_sum16", "attn_sum",
              "attn_pv", "attn_out")
    parts = {}
    for base in stages:
        parts[base] = _find(sch, base)
        if parts[base] is None:
            raise ValueError(f"attention: stage {base} missing")
    done = {_name(sch, x) for x in parts.values()}
    out = parts["attn_out"]
    b, h, i, d = sch.get_loops(out)
    # Row stages are computed for a chunk of query rows at a time: their row buffers are
    # sized by the symbolic key count, i.e. heap workspaces, allocated once per chunk.
    io, ii = sch.split(i, [None, ATTN_ROW_CHUNK])
    row = sch.fuse(b, h, io)
    for base in ("attn_pv", "attn_sum", "attn_sum16", "attn_exp", "attn_max", "attn_max16", "attn_qk", "attn_q"):
        sch.compute_at(parts[base], row, preserve_unit_loops=False)
    sch.parallel(row)
    _vectorize_last(sch, out, info.lanes, skip=1)
    _vectorize_last(sch, parts["attn_q"], info.lanes, skip=1)
    jo, ji = sch.split(sch.get_loops(parts["attn_exp"])[-1], [None, ATTN_KEY_TILE])  # T_pad: exact
    sch.vectorize(ji)
    # q.k as a register tile: per tile of 16 keys, the head dim outside, then the chunk's 8
    # query rows (unrolled: 8 independent accumulator chains sharing each K^T vector load),
    # then the tile's keys (vectorized)
    qk = parts["attn_qk"]
    i, j, rd = sch.get_loops(qk)[-3:]
    jo, ji = sch.split(j, [None, ATTN_KEY_TILE])
    sch.reorder(jo, rd, i, ji)
    sch.vectorize(ji)
    sch.unroll(i)
    init = sch.decompose_reduction(qk, rd)
    _vectorize_last(sch, init, info.lanes, skip=1)
    _vectorize_reduction_lanes(sch, parts["attn_max16"], info.lanes)
    _vectorize_reduction_lanes(sch, parts["attn_sum16"], info.lanes)
    _vectorize_reduction_lanes(sch, parts["attn_pv"], info.lanes)  # keys outside, value dim vectorized
    # K transposed, V copied (and the mask bias) once, in parallel over their outer loops
    for base in ("attn_kT", "attn_v", "attn_bias"):
        blk = _find(sch, base)
        if blk is not None:
            done.add(_name(sch, blk))
            _vectorize_last(sch, blk, info.lanes)
            _parallel_outer(sch, blk, 2)
    # anything else left at the top level (un-inlined prologues): per block
    for blk in _top_blocks(sch):
        if any(_name(sch, blk).startswith(d) for d in done):  # incl. the *_init blocks
            continue
        if _is_reduction(sch, blk):
            raise ValueError("attention: unexpected reduction")
        _schedule_injective(sch, blk, info)


def schedule_func(func: tirx.PrimFunc, info: CpuInfo) -> tuple[tirx.PrimFunc, str]:
    """(scheduled func, strategy name). Falls back strategy by strategy; never fails."""
    names = set()
    probe = s_tir.Schedule(func)
    for b in _top_blocks(probe):
        names.add(_base(_name(probe, b)))
    strategies = []
    if "attn_qk" in names:
        strategies.append(("attention", schedule_attention))
    if "matmul_acc" in names:
        strategies.append(("matmul", schedule_matmul))
        strategies.append(("matmul_separate_epilogue",
                           lambda sch, info: schedule_matmul(sch, info, fuse_epilogue=False)))
    strategies += [("rows", schedule_rows), ("per_block", schedule_per_block)]
    for label, strat in strategies:
        sch = s_tir.Schedule(func)
        try:
            inline_injective(sch)
            strat(sch, info)
        except Exception as e:  # noqa: BLE001 - try the next, more general strategy
            if os.environ.get("LLMC_SCHEDULE_DEBUG"):
                print(f"[llmc schedule] {func.attrs['global_symbol']}: {label} failed: {str(e).splitlines()[-1][:300]}")
            continue
        return sch.mod["main"], label
    return func, "none"
