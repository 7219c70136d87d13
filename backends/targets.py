"""Target names users type, mapped to TVM target dicts and the runtime device."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TargetError


@dataclass(frozen=True)
class TargetSpec:
    kind: str  # llvm | cuda | rocm | metal
    arch: str = ""  # sm_90 / gfx942 / ...
    device: str = "cpu"  # the runtime device the artifact runs on

    def tvm_target(self) -> dict:
        if self.kind == "llvm":
            return {"kind": "llvm"}
        if self.kind == "cuda":
            return {"kind": "cuda", "arch": self.arch, "max_shared_memory_per_block": 49152}
        if self.kind == "rocm":
            return {"kind": "rocm", "mcpu": self.arch}
        return {"kind": "metal"}

    def __str__(self) -> str:
        return f"{self.kind}:{self.arch}" if self.arch else self.kind


_DEFAULT_ARCH = {"cuda": "sm_90", "rocm": "gfx942", "metal": "", "llvm": ""}
_DEVICE = {"llvm": "cpu", "cuda": "cuda", "rocm": "rocm", "metal": "metal"}


def parse_target(target: str | dict | TargetSpec) -> TargetSpec:
    """'llvm' | 'cpu' | 'cuda' | 'cuda:sm_80' | 'rocm:gfx90a' | 'metal' | {'kind': ..., 'arch': ...}."""
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, dict):
        kind, arch = str(target.get("kind", "")), str(target.get("arch", target.get("mcpu", "")))
    elif isinstance(target, str):
        kind, _, arch = target.strip().partition(":")
    else:
        raise TargetError(f"target must be a string or dict, got {type(target).__name__}")
    kind = {"cpu": "llvm"}.get(kind, kind)
    if kind not in _DEFAULT_ARCH:
        raise TargetError(f"unknown target {target!r}; choose one of llvm (cpu), cuda[:sm_XX], rocm[:gfxXXX], metal")
    arch = arch or _DEFAULT_ARCH[kind]
    if kind == "cuda" and not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
        raise TargetError(f"bad CUDA arch {arch!r}; expected e.g. sm_80 or sm_90")
    if kind == "rocm" and not arch.startswith("gfx"):
        raise TargetError(f"bad ROCm arch {arch!r}; expected e.g. gfx90a or gfx942")
    return TargetSpec(kind, arch, _DEVICE[kind])
