"""GPU schedules for lowered kernels (CUDA, ROCm, Metal): dlight's rules, checked.

    with target:                                   # dlight reads the target from the scope
        func = schedule_gpu_func(lower_kernel(k), target)
        ex = tvm.compile(tvm.IRModule({k.name: func}), target=target)
    assert_device_code(ex)

The first rule that returns a schedule wins (Matmul, GEMV, LowBatchGEMV, Reduction,
GeneralReduction, then `Injective` below for spatial-only kernels, then Fallback). A rule that raises is skipped. A PrimFunc that no rule
schedules would compile, silently, into a serial *host* loop over device pointers
(notes s.3.1), so a function left without thread bindings raises an LLMCError here, and
`assert_device_code` checks that compiling produced a device module at all.
"""
from __future__ import annotations

from typing import Sequence

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from llmc.errors import LLMCError

# module kinds of device code (a CUDA module built without the driver is still "cuda")
DEVICE_MODULE_KINDS = frozenset({"cuda", "hip", "rocm", "metal", "opencl", "vulkan", "webgpu"})


class Injective(GPUScheduleRule):
    """Spatial-only kernels (elementwise, slices, concat, transposes, gathers).

    dlight's Fallback gives each thread one element of a 1024-thread block. Here every stage
    is inlined into the outputs. "rows" (default) gives a block to each combination of the
    leading symbolic dims ([batch, seq]) and spreads the static trailing dims over its
    threads (each thread `threads` apart, so every access is coalesced): fusing all loops
    into one index instead makes TVM recover every dim by dividing by runtime values, per
    element and per access (an H100, MiniLM's exact GELU: 25.4 us "strided", 8.4 us "rows";
    Llama's rotary 51 vs 34 us). Where that does not apply (static shapes, or fewer trailing
    elements than threads) it falls back to "strided": each output's loops are fused and
    split so that a thread handles `per` elements (16 bytes of output) `threads` apart;
    "unroll" takes `per` consecutive elements of a static innermost dimension; "vector" does
    the same as one vector access (TVM 0.27's CUDA codegen rejects that for bf16/bool);
    "none" is one element per thread.
    """

    def __init__(self, threads: int = 256, mode: str = "rows", vector_bytes: int = 16):
        self.threads, self.mode, self.vector_bytes = threads, mode, vector_bytes

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if any("R" in i.dom_kind() or "O" in i.dom_kind() for i in infos):
            return None
        for info in infos:
            block = info.block_rv
            if any(sch.get(lp).thread_binding is not None for lp in sch.get_loops(block)):
                continue
            loops = list(sch.get_loops(block)) or [sch.add_unit_loop(block)]
            writes = sch.get(block).writes
            nbytes = max(1, tvm.DataType(str(writes[0].source.dtype)).bits // 8) if writes else 4
            per = max(1, self.vector_bytes // nbytes) if self.mode != "none" else 1
            if self.mode == "rows" and self._rows(sch, loops):
                continue
            if self.mode in ("strided", "rows"):  # per-thread elements `threads` apart: every access coalesced
                fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                bx, p, tx = sch.split(fused, [None, per, self.threads])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                if per > 1:
                    sch.unroll(p)
                continue
            ext = sch.get(loops[-1]).extent
            inner = None
            if per > 1 and isinstance(ext, tirx.IntImm) and ext.value % per == 0 and ext.value >= per:
                outer, inner = sch.split(loops[-1], [None, per])
                loops = loops[:-1] + [outer]
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            bx, tx = sch.split(fused, [None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            if inner is not None:
                (sch.vectorize if self.mode == "vector" else sch.unroll)(inner)
        return sch

    def _rows(self, sch, loops) -> bool:
        """One block per combination of the leading symbolic dims, threads over the static
        trailing ones: the runtime-valued divisions happen once per block instead of once
        per element and access. Declines (False) when the static part is under a block."""
        static = 0
        for lp in reversed(loops):
            if not isinstance(sch.get(lp).extent, tirx.IntImm):
                break
            static += 1
        if static == 0 or static == len(loops):
            return False
        inner_extent = 1
        for lp in loops[-static:]:
            inner_extent *= sch.get(lp).extent.value
        if inner_extent < self.threads:
            return False
        outer = sch.fuse(*loops[:-static]) if len(loops) - static > 1 else loops[0]
        inner = sch.fuse(*loops[-static:]) if static > 1 else loops[-1]
        p, tx = sch.split(inner, [None, self.threads])
        sch.bind(outer, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.unroll(p)
        return True


def default_rules() -> list:
    import os

    # LLMC_GPU_INJECTIVE=rows|strided|unroll|none|fallback: a tuning knob for elementwise kernels
    mode = os.environ.get("LLMC_GPU_INJECTIVE", "rows")
    inj = [] if mode == "fallback" else [Injective(mode=mode)]
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), *inj, dl.gpu.Fallback()]


def _as_func(sch) -> tirx.PrimFunc | None:
    if sch is None:
        return None
    if isinstance(sch, (list, tuple)):  # some rules return candidate schedules; the first is the default
        if not sch:
            return None
        sch = sch[0]
    return sch.mod["main"]


def has_thread_binding(func: tirx.PrimFunc) -> bool:
    """True if some loop of `func` is bound to a GPU block/thread axis (so it launches a kernel).

    TVM 0.27's Python API has no TIR visitor; the serialized function names its thread tags.
    """
    text = tvm.ir.save_json(func)
    return "blockIdx." in text or "threadIdx." in text


def schedule_gpu_func(func: tirx.PrimFunc, target: tvm.target.Target, rules: Sequence | None = None,
                      name: str | None = None) -> tirx.PrimFunc:
    """Schedule one PrimFunc for a GPU target with dlight; call inside `with target:`.

    Returns the scheduled PrimFunc (attributes such as `global_symbol` kept, and
    `tirx.is_scheduled` set). Raises LLMCError if no rule gives it GPU thread bindings.
    `schedule_gpu_func.last_rule` names the rule that won (for reports).
    """
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    label = name or (str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else "?")
    errors: list[str] = []
    for rule in (rules if rules is not None else default_rules()):
        try:
            out = _as_func(rule.apply(func, target, False))
        except Exception as e:  # noqa: BLE001 - a rule that cannot handle this shape: try the next
            errors.append(f"{type(rule).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__}")
            continue
        if out is None:
            continue
        if not has_thread_binding(out):
            errors.append(f"{type(rule).__name__}: left no thread binding")
            continue
        if func.attrs is not None:
            for k, v in func.attrs.items():
                if out.attrs is None or k not in out.attrs:
                    out = out.with_attr(k, v)
        schedule_gpu_func.last_rule = type(rule).__name__
        return out.with_attr("tirx.is_scheduled", True)
    raise LLMCError(f"no GPU schedule applies to kernel {label} for {target.kind.name}"
                    + (": " + "; ".join(errors) if errors else ""))


schedule_gpu_func.last_rule = ""


def device_modules(executable) -> list:
    mod = getattr(executable, "mod", executable)
    out, stack = [], list(mod.imports)
    while stack:
        m = stack.pop()
        if m.kind in DEVICE_MODULE_KINDS:
            out.append(m)
        stack.extend(m.imports)
    return out


def assert_device_code(executable, what: str = "kernels") -> list:
    """Raise LLMCError unless compiling produced at least one device module; returns them."""
    mods = device_modules(executable)
    if not mods:
        mod = getattr(executable, "mod", executable)
        raise LLMCError(f"building {what} produced no device code (host module {mod.kind!r}, imports "
                        f"{[m.kind for m in mod.imports]}): an unscheduled GPU function became a host loop")
    return mods


__all__ = ["schedule_gpu_func", "assert_device_code", "device_modules", "default_rules", "has_thread_binding"]
