"""Does this processor have the instruction-set extensions an artifact's CPU kernels use?

A CPU artifact's manifest has a `cpu` section {"triple", "mcpu", "features"} (written at
compile time from the LLVM target). Running its kernels on a processor without one of
those features kills the process with SIGILL, so the loader checks first.

The host's features come from numpy's own run-time detection (CPUID on x86, hwcaps on
Arm), which is what the processor really executes; /proc/cpuinfo is not used because an
emulator such as qemu-user passes the real host's file through.
"""
from __future__ import annotations

import functools
import platform
from typing import Mapping

from ..errors import ArtifactError


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str]:
    """The extensions this processor supports, by numpy's names ('AVX2', 'FMA3', 'AVX512F', ...)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as found
    return frozenset(name for name, present in found.items() if present)


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _triple_arch(triple: str) -> str:
    arch = triple.split("-", 1)[0].lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def check_host_cpu(section: Mapping, where: str) -> None:
    """Raise ArtifactError unless this processor can run code built for `section` (the
    manifest's `cpu` section as JSON, or the typed manifest's CpuSpec).

    `where` names the artifact (its folder or manifest) in the message."""
    if hasattr(section, "features") and hasattr(section, "mcpu"):  # the typed manifest's CpuSpec
        section = {"triple": section.triple, "mcpu": section.mcpu, "features": list(section.features)}
    if not isinstance(section, Mapping):
        raise ArtifactError(f"{where}: manifest section 'cpu' must be an object, got {type(section).__name__}")
    triple, mcpu, features = section.get("triple"), section.get("mcpu"), section.get("features")
    if not isinstance(triple, str) or not isinstance(mcpu, str):
        raise ArtifactError(f"{where}: manifest section 'cpu' needs string 'triple' and 'mcpu'")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ArtifactError(f"{where}: manifest section 'cpu': 'features' must be a list of strings")
    arch = _triple_arch(triple)
    if arch != host_arch():
        raise ArtifactError(f"{where}: the CPU kernels were built for {arch} ({triple}), this machine is "
                            f"{host_arch()}; recompile the model on (or for) this architecture")
    missing = sorted(set(features) - host_cpu_features())
    if missing:
        raise ArtifactError(f"{where}: the CPU kernels were built for CPU {mcpu!r} and use {', '.join(missing)}, "
                            f"which this processor lacks; running them would crash with an illegal instruction. "
                            f"Recompile with the default portable target (--target llvm) or for this machine "
                            f"(--cpu native)")
