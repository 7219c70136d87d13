"""Build a Program's kernels for the requested target (dispatches per target kind)."""
from __future__ import annotations

import functools
import sys
import time
from typing import Callable, Mapping

from ..compiler.program import Kernel
from .lower import describe_kernel
from .targets import TargetSpec


def _require_compiler() -> None:
    tvm = sys.modules.get("tvm")
    if tvm is not None and getattr(tvm.base, "_RUNTIME_ONLY", False):
        from ..errors import LLMCError

        raise LLMCError("TVM was imported runtime-only in this process (llmc.load before llmc.compile); "
                        "compile first, or set TVM_USE_RUNTIME_LIB=0 before loading artifacts")


def build_kernels(kernels: Mapping[str, Kernel], target: TargetSpec, progress: Callable[[str], None] | None = None,
                  use_shim: bool = True, symbols: Mapping | None = None, use_blas: bool = True):
    _require_compiler()
    from ..runtime.tvm_runtime import use_all_cores

    use_all_cores()  # in-process CompiledModel calls run these kernels right away
    t = time.perf_counter()
    if target.kind == "llvm":
        from .build import build_cpu

        ex = build_cpu(kernels, target.tvm_target(), use_blas=use_blas)
    elif target.kind == "cuda":
        from .build_cuda import build_kernels as build_cuda

        ex = build_cuda(kernels, target, use_shim=use_shim, progress=progress, symbols=symbols)
    elif target.kind in ("rocm", "metal"):
        from .build_gpu_targets import build_metal, build_rocm

        ex = (build_rocm if target.kind == "rocm" else build_metal)(kernels, target)
    else:
        from ..errors import TargetError

        raise TargetError(f"target {target} is not built yet")
    if progress:
        progress(f"built {len(kernels)} kernels in {time.perf_counter() - t:.1f}s")
    return ex


def build_program_for(target: TargetSpec, use_blas: bool = True, gemm_weight_layout: bool = True,
                      use_shim: bool = True):
    """The Graph -> Program builder for a target: CUDA and CPU group kernels for their library
    offloads (cuBLASLt and flash attention; llmc's CPU GEMM or the BLAS), with the GEMM weights
    stored [N, K] for llmc's CPU GEMM and the CUDA shim's decode GEMV unless `gemm_weight_layout`
    is off (or, for CUDA, the shim is)."""
    if target.kind == "cuda":
        from .build_cuda import build_program

        return functools.partial(build_program, fuse_gemv=gemm_weight_layout and use_shim)
    from ..passes.pipeline import build_program

    if target.kind == "llvm" and use_blas:
        from .cpu_blas import cpu_grouping
        from .cpu_gemm import gemm_library

        # attention runs in llmc's CPU kernel library where this host builds it (x86-64 with g++)
        grouping = functools.partial(cpu_grouping, attention=gemm_library() is not None)
        return functools.partial(build_program, grouping=grouping, grouping_name="cpu_grouping",
                                 prepare=_cpu_prepare if gemm_weight_layout else None)
    return build_program


def _cpu_prepare(graph):
    """GEMM weights stored [N, K], the layout llmc's CPU GEMM reads (passes/gemm_weight_layout.py)."""
    from ..passes.gemm_weight_layout import transpose_gemm_weights

    graph, report = transpose_gemm_weights(graph)
    return graph, report.lines[0]


__all__ = ["build_kernels", "build_program_for", "describe_kernel"]
