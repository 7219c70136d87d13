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
from typing import Iterable, Mapping

from ..errors import ArtifactError


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str]:
    """The extensions this processor supports, by numpy's names ('AVX2', 'FMA3', 'AVX512F', ...)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as found
    return frozenset(name for name, present in found.items() if present)


def _canonical_arch(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def host_arch() -> str:
    return _canonical_arch(platform.machine())


def _triple_arch(triple: str) -> str:
    return _canonical_arch(triple.split("-", 1)[0])


def check_host_cpu(section: Mapping, where: str) -> None:
    """Raise ArtifactError unless this processor can run code built for `section` (a
    manifest's `cpu` section as JSON). `where` names the artifact in the message."""
    if not isinstance(section, Mapping):
        raise ArtifactError(f"{where}: manifest section 'cpu' must be an object, got {type(section).__name__}")
    triple, mcpu, features = section.get("triple"), section.get("mcpu"), section.get("features")
    if not isinstance(triple, str) or not isinstance(mcpu, str):
        raise ArtifactError(f"{where}: manifest section 'cpu' needs string 'triple' and 'mcpu'")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ArtifactError(f"{where}: manifest section 'cpu': 'features' must be a list of strings")
    check_cpu(triple, mcpu, features, where)


def check_cpu(triple: str, mcpu: str, features: Iterable[str], where: str) -> None:
    """Raise ArtifactError unless this processor has the architecture and every feature that
    code built for (triple, mcpu) uses (the typed manifest's CpuSpec, already validated)."""
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
