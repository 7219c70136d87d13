"""Build kernels for ROCm (AMDGPU code objects) and Metal (MSL + macOS host objects).

Neither device is needed to build; neither artifact can run on the Linux build machine.

    ex = build_rocm(program.kernels, parse_target("rocm:gfx942"))
    ex.export_library("kernels.so")        # x86-64 host code with the code object embedded
    ex = build_metal(program.kernels, parse_target("metal"))
    library_writer(ex, spec)("kernels.tar")  # Mach-O arm64 lib0.o + devc.o (MSL inside)

ROCm: TVM's LLVM 22 emits code object v6, linked by lld against the device-library bitcode
(ocml/ockl). `find_rocm_toolchain` finds both: the folder `tools/setup_rocm_toolchain.sh`
fills from Debian packages, or a ROCm install. Each build checks its code object (an
AMDGPU ELF for the requested gfx arch, with every kernel's entry symbols).

Metal: device code stays Metal Shading Language source, compiled by the Metal driver when
the library loads; the host part is arm64-apple-macos code. Linking it into a dylib needs
macOS, so the library is exported as a .tar of objects, which TVM links when it loads it.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import tvm
import tvm_ffi

from llmc.compiler.program import Kernel
from llmc.errors import LLMCError, TargetError

from .gpu_schedule import assert_device_code, schedule_gpu_func
from .lower import lower_kernel
from .targets import TargetSpec

SETUP_SCRIPT = "tools/setup_rocm_toolchain.sh"


class ToolchainError(LLMCError):
    """A build tool or device library that a target needs is missing or unusable."""


class CodeObjectError(LLMCError):
    """A built device binary is not what was asked for (wrong arch, missing kernels)."""


# ---------------------------------------------------------------- ROCm toolchain


@dataclass(frozen=True)
class RocmToolchain:
    rocm_path: pathlib.Path  # holds amdgcn/bitcode/{ocml,ockl,oclc_*}.bc
    lld: pathlib.Path  # an ld.lld at least as new as TVM's LLVM
    source: str  # where it was found, for messages

    @property
    def bitcode_dir(self) -> pathlib.Path:
        return self.rocm_path / "amdgcn" / "bitcode"


def default_toolchain_dir() -> pathlib.Path:
    """Where tools/setup_rocm_toolchain.sh unpacks (LLMC_ROCM_TOOLCHAIN overrides it)."""
    if os.environ.get("LLMC_ROCM_TOOLCHAIN"):
        return pathlib.Path(os.environ["LLMC_ROCM_TOOLCHAIN"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "llmc" / "rocm"


def _llvm_major() -> int:
    return int(tvm.target.codegen.llvm_version_major(allow_none=True) or 22)


def _lld_major(lld: str | os.PathLike) -> int | None:
    try:
        out = subprocess.run([str(lld), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"LLD (\d+)\.", out)
    return int(m.group(1)) if m else None


def _read_env_file(path: pathlib.Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip().strip('"')
    return out


def find_rocm_toolchain() -> RocmToolchain:
    """The bitcode folder and lld a ROCm build links with, or a ToolchainError saying how to get them.

    Looks at, in order: the setup script's folder (LLMC_ROCM_TOOLCHAIN, default
    ~/.cache/llmc/rocm), then ROCM_PATH (or /opt/rocm) with an lld from LLMC_ROCM_LLD,
    `ld.lld-<N>`/`ld.lld` on PATH or $ROCM_PATH/llvm/bin. lld must be at least LLVM N, the
    version inside TVM: older ones cannot read its code objects ("unknown abi version").
    """
    need = _llvm_major()
    problems: list[str] = []
    folder = default_toolchain_dir()
    env_file = folder / "toolchain.env"
    if env_file.is_file():
        env = _read_env_file(env_file)
        tc = RocmToolchain(pathlib.Path(env.get("ROCM_PATH", "")), pathlib.Path(env.get("LLD", "")), str(folder))
        problem = _toolchain_problem(tc, need)
        if problem is None:
            return tc
        problems.append(f"{folder}: {problem}")
    elif os.environ.get("LLMC_ROCM_TOOLCHAIN"):
        problems.append(f"LLMC_ROCM_TOOLCHAIN={folder} has no toolchain.env")

    rocm = os.environ.get("ROCM_PATH") or ("/opt/rocm" if os.path.isdir("/opt/rocm") else "")
    if rocm:
        candidates = [os.environ.get("LLMC_ROCM_LLD", ""), shutil.which(f"ld.lld-{need}") or "",
                      os.path.join(rocm, "llvm", "bin", "ld.lld"), shutil.which("ld.lld") or ""]
        lld_problems = []
        for lld in filter(None, candidates):
            tc = RocmToolchain(pathlib.Path(rocm), pathlib.Path(lld), f"ROCM_PATH={rocm}")
            problem = _toolchain_problem(tc, need)
            if problem is None:
                return tc
            lld_problems.append(problem)
        problems.append(f"ROCM_PATH={rocm}: " + ("; ".join(lld_problems) if lld_problems else "no ld.lld found"))
    raise ToolchainError(
        f"building for ROCm needs the AMDGPU device-library bitcode and ld.lld >= {need}; run "
        f"`bash {SETUP_SCRIPT}` (Debian 12: fetches rocm-device-libs and lld-{need} into {folder}, "
        f"about 32 MB, nothing installed system-wide), or point ROCM_PATH at a ROCm install"
        + (" (" + " | ".join(problems) + ")" if problems else ""))


def _toolchain_problem(tc: RocmToolchain, need: int) -> str | None:
    for name in ("ocml", "ockl"):
        if not (tc.bitcode_dir / f"{name}.bc").is_file():
            return f"no {tc.bitcode_dir / (name + '.bc')}"
    major = _lld_major(tc.lld)
    if major is None:
        return f"{tc.lld} does not run"
    if major < need:
        return f"{tc.lld} is lld {major}, older than TVM's LLVM {need}"
    return None


_CALLBACK_LOCK = threading.Lock()


class _LinkLog:
    def __init__(self) -> None:
        self.objects: list[bytes] = []  # code objects linked
        self.error: ToolchainError | None = None  # a link failure (TVM re-raises it as RuntimeError)


@contextlib.contextmanager
def _rocm_callbacks(tc: RocmToolchain):
    """Point TVM's ROCm link/bitcode callbacks at `tc` while building; yields a _LinkLog.

    TVM looks the callbacks up by name at build time; without this it would read
    ROCM_PATH/PATH from the environment. The originals are put back afterwards.
    """
    import tvm.support.rocm as rocm  # registers the default callbacks

    log = _LinkLog()

    def link(obj_bin):
        d = tvm.support.utils.tempdir()
        obj, co = d.relpath("kernels.o"), d.relpath("kernels.co")
        with open(obj, "wb") as f:
            f.write(bytes(obj_bin))
        try:
            rocm.rocm_link(obj, co, lld=str(tc.lld))
        except RuntimeError as e:
            log.error = ToolchainError(f"linking the AMDGPU code object with {tc.lld} ({tc.source}) failed: {e}")
            raise log.error from None
        data = pathlib.Path(co).read_bytes()
        log.objects.append(data)
        return bytearray(data)

    def bitcode_path(rocdl_dir=None):
        return rocm.callback_rocm_bitcode_path(str(tc.bitcode_dir) if rocdl_dir is None else rocdl_dir)

    names = {"tvm_callback_rocm_link": link, "tvm_callback_rocm_bitcode_path": bitcode_path}
    with _CALLBACK_LOCK:
        saved = {n: tvm_ffi.get_global_func(n) for n in names}
        try:
            for n, f in names.items():
                tvm_ffi.register_global_func(n, f, override=True)
            yield log
        finally:
            for n, f in saved.items():
                tvm_ffi.register_global_func(n, f, override=True)


# ---------------------------------------------------------------- building


def rocm_archs() -> list[str]:
    """The gfx processors TVM's LLVM can generate code for."""
    amdgcn = tvm.target.Target({"kind": "llvm", "mtriple": "amdgcn-amd-amdhsa"})
    return sorted(str(a) for a in tvm.target.codegen.llvm_get_cpu_archlist(amdgcn)
                  if re.fullmatch(r"gfx[0-9a-f]+", str(a)))


def rocm_target(spec: TargetSpec) -> tvm.target.Target:
    if spec.kind != "rocm":
        raise TargetError(f"expected a ROCm target such as rocm:gfx942, got {spec}")
    # checked here: LLVM aborts the whole process on a processor it does not know
    known = rocm_archs()
    if spec.arch not in known:
        raise TargetError(f"ROCm arch {spec.arch!r} is unknown to TVM's LLVM {_llvm_major()}; "
                          f"choose one of {', '.join(known)}")
    return tvm.target.Target({"kind": "rocm", "mcpu": spec.arch})


# Host code for arm64 macOS. The M1 tag by default: its host code runs on every Apple-silicon
# Mac (the MSL is compiled on the Mac anyway); metal:m2 opts into M2's host CPU features.
_METAL_TAGS = {"": "apple/m1-gpu", "m1": "apple/m1-gpu", "m2": "apple/m2-gpu"}


def metal_target(spec: TargetSpec) -> tvm.target.Target:
    if spec.kind != "metal" or spec.arch not in _METAL_TAGS:
        raise TargetError(f"expected a Metal target: metal, metal:m1 or metal:m2, got {spec}")
    return tvm.target.Target(_METAL_TAGS[spec.arch])


def _scheduled_module(kernels: Mapping[str, Kernel], target: tvm.target.Target) -> tvm.IRModule:
    funcs = {}
    with target:
        for name, k in kernels.items():
            if name != k.name:
                raise ValueError(f"kernel registered as {name!r} is named {k.name!r}")
            funcs[name] = schedule_gpu_func(lower_kernel(k), target, name=name).with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


def build_rocm(kernels: Mapping[str, Kernel], spec: TargetSpec) -> tvm.runtime.Executable:
    """Lower, schedule (dlight) and compile every kernel for an AMD GPU; checks the code object.

    The Executable's host module is x86-64 code: `export_library("kernels.so")` works here
    and embeds the code object. Loading it needs a TVM runtime built with ROCm.
    """
    target = rocm_target(spec)
    tc = find_rocm_toolchain()
    mod = _scheduled_module(kernels, target)
    with target, _rocm_callbacks(tc) as log:
        try:
            ex = tvm.compile(mod, target=target)
        except Exception:
            if log.error is not None:
                raise log.error from None
            raise
    assert_device_code(ex, f"{len(kernels)} kernels for {spec}")
    if len(log.objects) != 1:
        raise CodeObjectError(f"expected one AMDGPU code object for {spec}, the build linked {len(log.objects)}")
    check_code_object(log.objects[0], spec.arch, kernels)
    return ex


def build_metal(kernels: Mapping[str, Kernel], spec: TargetSpec) -> tvm.runtime.Executable:
    """Lower, schedule (dlight) and compile every kernel for Metal; checks the MSL has every kernel.

    Export it with `library_writer(ex, spec)` (a .tar of Mach-O objects): `export_library`
    to a .so would need a macOS linker.
    """
    target = metal_target(spec)
    mod = _scheduled_module(kernels, target)
    with target:
        ex = tvm.compile(mod, target=target)
    assert_device_code(ex, f"{len(kernels)} kernels for {spec}")
    missing = missing_kernels(metal_kernel_names(metal_source(ex)), kernels)
    if missing:
        raise CodeObjectError(f"the Metal source for {spec} lacks kernels {missing}")
    return ex


def library_file(spec: TargetSpec) -> str:
    """File name of the kernel library inside an artifact for this target."""
    return "kernels.tar" if spec.kind == "metal" else "kernels.so"


def library_writer(executable, spec: TargetSpec) -> Callable[[str], str]:
    """`writer(path)` exports the kernel library for `spec` and returns the file it wrote.

    Metal: a .tar (Mach-O arm64 lib0.o + devc.o) at `path` with its suffix made .tar, plus
    the MSL beside it as `<stem>.metal` for reading (nothing loads that file).
    Other targets: a shared library at `path`.
    """
    def write(path: str) -> str:
        if spec.kind != "metal":
            executable.export_library(str(path))
            return str(path)
        out = pathlib.Path(path)
        out = out if out.suffix == ".tar" else out.with_suffix(".tar")
        executable.export_library(str(out))
        out.with_suffix(".metal").write_text(metal_source(executable))
        return str(out)

    return write


# ---------------------------------------------------------------- inspecting device code


def kernel_symbol_pattern(name: str) -> re.Pattern:
    """Device entry points of one llmc kernel: `<name>_kernel`, then `<name>_kernel_1`, ..."""
    return re.compile(re.escape(name) + r"_kernel(?:_\d+)?")


def missing_kernels(device_names: Iterable[str], kernels: Iterable[str]) -> list[str]:
    names = list(device_names)
    return sorted(k for k in kernels if not any(kernel_symbol_pattern(k).fullmatch(s) for s in names))


def metal_source(executable) -> str:
    from .gpu_schedule import device_modules

    return "\n".join(m.inspect_source() for m in device_modules(executable) if m.kind == "metal")


def metal_kernel_names(msl: str) -> list[str]:
    return re.findall(r"\bkernel\s+void\s+(\w+)\s*\(", msl)


# AMDGPU ELF (the LLVM AMDGPUUsage document): e_machine 224, EI_OSABI 64 (AMDHSA),
# EI_ABIVERSION 2/3/4 = code object v4/v5/v6, e_flags & 0xff = the processor.
EM_AMDGPU = 224
ELFOSABI_AMDGPU_HSA = 64
EF_AMDGPU_MACH = 0xFF
AMDGPU_MACH = {"gfx900": 0x2C, "gfx906": 0x2F, "gfx908": 0x30, "gfx90a": 0x3F, "gfx942": 0x4C,
               "gfx950": 0x4F, "gfx1030": 0x36, "gfx1100": 0x41, "gfx1200": 0x48, "gfx1201": 0x4E}


@dataclass(frozen=True)
class AmdgpuCodeObject:
    osabi: int
    abi_version: int  # code object version - 2
    e_type: int
    e_flags: int
    symbols: dict[str, int]  # name -> ELF symbol type (2 = FUNC, 1 = OBJECT)

    @property
    def mach(self) -> int:
        return self.e_flags & EF_AMDGPU_MACH

    @property
    def code_object_version(self) -> int:
        return self.abi_version + 2

    @property
    def kernels(self) -> list[str]:
        """Kernel entry points: FUNC symbols with a matching `<name>.kd` descriptor."""
        return sorted(n for n, t in self.symbols.items() if t == 2 and f"{n}.kd" in self.symbols)


def elf_symbols(data: bytes) -> dict[str, int]:
    """Names in the symbol tables (.symtab and .dynsym) of a 64-bit little-endian ELF -> symbol type."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise CodeObjectError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise CodeObjectError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    if shoff + shnum * shentsize > len(data):
        raise CodeObjectError("truncated ELF file (section headers past the end)")
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    symbols: dict[str, int] = {}
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        str_off, str_size = sections[link][4], sections[link][5]
        strtab = data[str_off:str_off + str_size]
        for j in range(1, size // entsize):
            st_name, st_info = struct.unpack_from("<IB", data, off + j * entsize)
            name = strtab[st_name:strtab.index(b"\0", st_name)].decode()
            if name:
                symbols[name] = st_info & 0xF
    return symbols


def parse_amdgpu_code_object(data: bytes) -> AmdgpuCodeObject:
    """Read the header and symbol tables of an AMDGPU ELF code object (CodeObjectError if it is not one)."""
    symbols = elf_symbols(data)
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_AMDGPU:
        raise CodeObjectError(f"ELF machine {e_machine}, not AMDGPU ({EM_AMDGPU})")
    e_flags, = struct.unpack_from("<I", data, 48)
    return AmdgpuCodeObject(data[7], data[8], e_type, e_flags, symbols)


def find_amdgpu_code_objects(blob: bytes) -> list[bytes]:
    """The AMDGPU ELF files embedded in `blob` (e.g. an exported kernels.so)."""
    out, i = [], blob.find(b"\x7fELF", 1)
    while i >= 0:
        if len(blob) >= i + 64 and struct.unpack_from("<H", blob, i + 18)[0] == EM_AMDGPU:
            shoff, = struct.unpack_from("<Q", blob, i + 40)
            shentsize, shnum = struct.unpack_from("<HH", blob, i + 58)
            end = shoff + shentsize * shnum  # lld writes the section headers last
            # TVM stores the code object as a length-prefixed string: prefer that length
            prefix = struct.unpack_from("<Q", blob, i - 8)[0] if i >= 8 else 0
            size = prefix if end <= prefix <= len(blob) - i else end
            out.append(bytes(blob[i:i + size]))
            i = blob.find(b"\x7fELF", i + size)
        else:
            i = blob.find(b"\x7fELF", i + 1)
    return out


def check_code_object(data: bytes, arch: str, kernels: Iterable[str]) -> AmdgpuCodeObject:
    """Raise CodeObjectError unless `data` is a loadable AMDHSA code object for `arch` with every kernel."""
    co = parse_amdgpu_code_object(data)
    if co.osabi != ELFOSABI_AMDGPU_HSA or co.e_type != 3:  # ET_DYN: what the HIP loader takes
        raise CodeObjectError(f"ELF OS/ABI {co.osabi}, type {co.e_type}: not an AMDHSA shared code object")
    want = AMDGPU_MACH.get(arch)
    if co.mach == 0 or (want is not None and co.mach != want):
        raise CodeObjectError(f"code object is for processor 0x{co.mach:x}, not {arch}"
                              + ("" if co.mach else " (LLVM does not know this arch)"))
    missing = missing_kernels(co.kernels, kernels)
    if missing:
        raise CodeObjectError(f"code object for {arch} lacks kernels {missing}")
    return co


__all__ = ["build_rocm", "build_metal", "library_file", "library_writer", "find_rocm_toolchain",
           "RocmToolchain", "ToolchainError", "CodeObjectError", "rocm_target", "metal_target",
           "parse_amdgpu_code_object", "elf_symbols", "find_amdgpu_code_objects", "check_code_object", "metal_source",
           "metal_kernel_names", "missing_kernels", "AMDGPU_MACH", "default_toolchain_dir", "rocm_archs"]
