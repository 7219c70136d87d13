"""Target names users type, mapped to TVM target dicts and the runtime device.

CPU targets: `llvm` (or `cpu`) builds for a portable baseline of the build host's
architecture (x86-64-v3 on x86_64: Haswell and newer, AVX2 + FMA; plain ARMv8-A with NEON
on aarch64), so an artifact copied to another machine runs there. `llvm:native` builds for
the build host's own processor (AVX-512 where it has it), and `llvm:<cpu>` for any CPU
name LLVM knows (`znver3`, `skylake-avx512`, `neoverse-v1`, ...). `cpu_section()` says
which instruction-set extensions the code may use, in the names numpy reports at run
time, so the runtime can refuse a machine that lacks them instead of dying with SIGILL.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from ..errors import TargetError
from ..runtime.cpu_features import host_arch  # the runtime's, so build and load agree on names

# The portable baseline per host architecture (LLVM CPU names).
PORTABLE_CPU = {"x86_64": "x86-64-v3", "aarch64": "generic"}


@dataclass(frozen=True)
class TargetSpec:
    kind: str  # llvm | cuda | rocm | metal
    arch: str = ""  # sm_90 / gfx942 / an LLVM CPU name ("" = the portable CPU baseline)
    device: str = "cpu"  # the runtime device the artifact runs on
    mattr: tuple[str, ...] = ()  # llvm: LLVM feature switches, e.g. ("-avx512fp16",) for what the host hides

    @property
    def mcpu(self) -> str:
        """llvm: the LLVM CPU name the kernels are built for."""
        return self.arch or PORTABLE_CPU.get(host_arch(), "generic")

    def tvm_target(self) -> dict:
        if self.kind == "llvm":
            # num-cores sizes the parallel splits of the CPU schedules
            target = {"kind": "llvm", "mcpu": self.mcpu, "num-cores": os.cpu_count() or 1}
            return {**target, "mattr": list(self.mattr)} if self.mattr else target
        if self.kind == "cuda":
            return {"kind": "cuda", "arch": self.arch, "max_shared_memory_per_block": 49152}
        if self.kind == "rocm":
            return {"kind": "rocm", "mcpu": self.arch}
        return {"kind": "metal"}

    def cpu_section(self) -> dict | None:
        """llvm: {"triple", "mcpu", "features"}: the features are the instruction-set
        extensions the code may use, named as numpy's runtime CPU detection names them
        (only those numpy can detect; e.g. AMX or AVX-VNNI are not listed). None otherwise."""
        if self.kind != "llvm":
            return None
        import tvm

        codegen = tvm.target.codegen
        triple = str(codegen.llvm_get_system_triple())
        target = {"kind": "llvm", "mcpu": self.mcpu, **({"mattr": list(self.mattr)} if self.mattr else {})}
        features = codegen.llvm_get_cpu_features(tvm.target.Target(target))
        return {"triple": triple, "mcpu": self.mcpu,
                "features": sorted({_NUMPY_NAME[str(f)] for f in features if str(f) in _NUMPY_NAME})}

    def __str__(self) -> str:
        return f"{self.kind}:{self.arch}" if self.arch else self.kind


_DEFAULT_ARCH = {"cuda": "sm_90", "rocm": "gfx942", "metal": "", "llvm": ""}
_DEVICE = {"llvm": "cpu", "cuda": "cuda", "rocm": "rocm", "metal": "metal"}

# LLVM feature name -> numpy's __cpu_features__ key (x86 and aarch64).
_NUMPY_NAME = {
    "mmx": "MMX", "sse": "SSE", "sse2": "SSE2", "sse3": "SSE3", "ssse3": "SSSE3", "sse4.1": "SSE41",
    "sse4.2": "SSE42", "popcnt": "POPCNT", "sahf": "LAHF", "cx16": "CX16", "lzcnt": "LZCNT", "movbe": "MOVBE",
    "bmi": "BMI", "bmi2": "BMI2", "f16c": "F16C", "fma": "FMA3", "fma4": "FMA4", "xop": "XOP", "avx": "AVX",
    "avx2": "AVX2", "avx512f": "AVX512F", "avx512cd": "AVX512CD", "avx512bw": "AVX512BW", "avx512dq": "AVX512DQ",
    "avx512vl": "AVX512VL", "avx512ifma": "AVX512IFMA", "avx512vbmi": "AVX512VBMI", "avx512vbmi2": "AVX512VBMI2",
    "avx512vnni": "AVX512VNNI", "avx512bitalg": "AVX512BITALG", "avx512vpopcntdq": "AVX512VPOPCNTDQ",
    "avx512fp16": "AVX512FP16", "avx512bf16": "AVX512BF16", "avx512er": "AVX512ER", "avx512pf": "AVX512PF",
    "avx5124fmaps": "AVX5124FMAPS", "avx5124vnniw": "AVX5124VNNIW", "gfni": "GFNI", "vaes": "VAES",
    "vpclmulqdq": "VPCLMULQDQ",
    "neon": "ASIMD", "fullfp16": "ASIMDHP", "dotprod": "ASIMDDP", "fp16fml": "ASIMDFHM", "sve": "SVE",
}


def host_cpu() -> str:
    """The build host's LLVM CPU name (e.g. 'emeraldrapids'); the portable one if LLVM can't tell."""
    import tvm

    cpu = str(tvm.target.codegen.llvm_get_system_cpu() or "")
    return cpu if cpu and cpu != "generic" else PORTABLE_CPU.get(host_arch(), "generic")


def _hidden_features(cpu: str) -> tuple[str, ...]:
    """LLVM switches turning off the extensions LLVM credits `cpu` with that this processor
    does not report (a VM may hide some, e.g. AVX-512 FP16): `llvm:native` must run here."""
    import tvm

    from ..runtime.cpu_features import host_cpu_features

    have = host_cpu_features()
    llvm = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    return tuple(sorted(f"-{f}" for f in map(str, llvm) if f in _NUMPY_NAME and _NUMPY_NAME[f] not in have))


def _check_cpu(name: str) -> str:
    import tvm

    codegen = tvm.target.codegen
    if name == "native":
        return host_cpu()
    if codegen.llvm_is_valid_cpu(name, str(codegen.llvm_get_system_triple())):
        return name
    known = [str(a) for a in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"}))]
    near = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; LLVM knows e.g. {', '.join(known[:8])}, ..."
    raise TargetError(f"unknown CPU {name!r} for target llvm:{name} (the build host is {host_arch()}){hint} "
                      f"Use plain 'llvm' for the portable baseline or 'llvm:native' for this machine")


def parse_target(target: str | dict | TargetSpec) -> TargetSpec:
    """'llvm' | 'cpu' | 'llvm:native' | 'llvm:<cpu>' | 'cuda' | 'cuda:sm_80' | 'rocm:gfx90a' | 'metal' |
    {'kind': ..., 'arch' or 'mcpu': ...}. `llvm:native` resolves to the host CPU's name."""
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
        raise TargetError(f"unknown target {target!r}; choose one of llvm (cpu)[:native|:<cpu>], cuda[:sm_XX], "
                          f"rocm[:gfxXXX], metal")
    arch = arch.strip() or _DEFAULT_ARCH[kind]
    mattr: tuple[str, ...] = ()
    if kind == "llvm" and arch:
        native = arch == "native"
        arch = _check_cpu(arch)
        mattr = _hidden_features(arch) if native else ()
        if arch == PORTABLE_CPU.get(host_arch()) and not mattr:
            arch = ""  # the portable baseline spelled out is the plain target
    if kind == "cuda" and not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
        raise TargetError(f"bad CUDA arch {arch!r}; expected e.g. sm_80 or sm_90")
    if kind == "rocm" and not arch.startswith("gfx"):
        raise TargetError(f"bad ROCm arch {arch!r}; expected e.g. gfx90a or gfx942")
    return TargetSpec(kind, arch, _DEVICE[kind], mattr)
