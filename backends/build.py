"""Build a set of kernels into one TVM Executable for a CPU (llvm) target.

    ex = build_kernels(program.kernels, default_target())
    ex.export_library("kernels.so")        # or call ex.mod[name](*params, *outputs, *symbols)
"""
from __future__ import annotations

from typing import Mapping

import tvm

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
