"""Build a set of kernels for a CPU (llvm) target.

    ex = build_kernels(program.kernels, default_target())   # every kernel through TVM
    ex.export_library("kernels.so")        # or call ex.mod[name](*params, *outputs, *symbols)

    ex = build_cpu(program.kernels, default_target())       # GEMMs to the BLAS (cpu_blas.py)
"""
from __future__ import annotations

import pathlib
import shutil
import time
from typing import Mapping

import tvm

from llmc.compiler.dtypes import DType
from llmc.compiler.program import Kernel
from llmc.errors import TargetError

from .lower import describe_kernel, lower_kernel
from .schedule import cpu_info, schedule_func
from .targets import TargetSpec, parse_target


def default_target() -> dict:
    """llvm for the portable CPU baseline of this host's architecture (see targets.py)."""
    return TargetSpec("llvm").tvm_target()


def host_target() -> dict:
    """llvm for this very host: its CPU name (so AVX-512 is used where present) and core count."""
    return parse_target("llvm:native").tvm_target()


def _check_target(target: Mapping) -> dict:
    target = dict(target)
    if target.get("kind") != "llvm":
        raise TargetError(f"the TVM CPU backend builds for kind 'llvm', got {target.get('kind')!r}")
    return target


def build_kernels(kernels: Mapping[str, Kernel], target: Mapping | None = None, *, schedule: bool = True,
                  report: dict | None = None) -> tvm.runtime.Executable:
    """Lower, schedule and compile every kernel into one Executable.

    `report`, when given, is filled with name -> (describe_kernel, schedule strategy).
    """
    target = _check_target(target or default_target())
    info = cpu_info(target)
    funcs = {}
    for name, k in kernels.items():
        if name != k.name:
            raise ValueError(f"kernel registered as {name!r} is named {k.name!r}")
        f = lower_kernel(k)
        label = "unscheduled"
        if schedule:
            f, label = schedule_func(f, info)
        funcs[name] = f.with_attr("global_symbol", name)
        if report is not None:
            report[name] = (describe_kernel(k), label)
    return tvm.compile(tvm.IRModule(funcs), target=target)


class CpuExecutable:
    """TVM kernels (`mod`; None when every kernel is a BLAS call), the per-kernel routes, and
    llmc's CPU GEMM library (`gemm_path`; None where it does not apply) for the BLAS routes."""

    def __init__(self, mod, routes: dict, labels: dict, timings: dict, gemm_path=None):
        self.mod = mod
        self.routes = routes  # kernel name -> BlasRoute / AttentionRoute / PagedRoute; absent: TVM
        self.labels = labels  # kernel name -> "tvm <strategy>" / route label
        self.timings = timings
        self.gemm_path = gemm_path

    def export_library(self, file: str) -> None:
        # with no TVM kernel at all, an empty library keeps the artifact layout
        (self.mod or tvm.compile(tvm.IRModule({}), target=default_target())).export_library(file)
        if self.gemm_path is not None:
            from .cpu_gemm import ARTIFACT_FILE

            shutil.copy2(self.gemm_path, pathlib.Path(file).parent / ARTIFACT_FILE)

    def update_manifest(self, manifest: dict) -> dict:
        program = dict(manifest["program"])
        kernels = {}
        for name, entry in program["kernels"].items():
            r = self.routes.get(name)
            kernels[name] = {**entry, **(r.to_json() if r is not None else {}), "schedule": self.labels.get(name, "")}
        manifest = dict(manifest, program=dict(program, kernels=kernels))
        if self.gemm_path is not None:
            from .artifact import with_library
            from .cpu_gemm import ARTIFACT_FILE

            manifest = with_library(manifest, "gemm", ARTIFACT_FILE)
        return manifest


def build_cpu(kernels: Mapping[str, Kernel], target: Mapping | None = None, use_blas: bool = True) -> CpuExecutable:
    """GEMMs that cpu_blas.match_blas recognises become BLAS calls, attentions that
    cpu_attention.match_attention recognises calls of llmc's CPU kernel library (where this host
    builds it); TVM builds the rest."""
    from .cpu_attention import AttentionRoute, match_attention
    from .cpu_blas import BlasRoute, match_blas
    from .cpu_gemm import gemm_library
    from .collective_route import match_runtime_comm
    from .paged_route import match_paged

    routes = {name: r for name, k in kernels.items() if (r := match_paged(k) or match_runtime_comm(k)) is not None}
    routes.update({name: r for name, k in kernels.items() if use_blas and (r := match_blas(k)) is not None})
    library = gemm_library() if use_blas else None
    if library is not None:
        routes.update({name: r for name, k in kernels.items() if (r := match_attention(k)) is not None})
    rest = {name: k for name, k in kernels.items() if name not in routes}
    report: dict = {}
    t = time.perf_counter()
    mod = build_kernels(rest, target, report=report) if rest else None
    labels = {name: f"tvm {label}" for name, (_, label) in report.items()}
    labels.update({name: r.label for name, r in routes.items()})
    uses_library = any(isinstance(r, AttentionRoute) or (isinstance(r, BlasRoute) and r.trans_b and r.dtype is DType.F32)
                       for r in routes.values())
    return CpuExecutable(mod, routes, labels, {"tvm_s": time.perf_counter() - t},
                         gemm_path=library if uses_library else None)
