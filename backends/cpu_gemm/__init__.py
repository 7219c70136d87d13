"""Build llmc's CPU kernel library (llmc_sgemm.cc: the GEMM; llmc_attention.cc: attention;
llmc_pool.h: their thread pool) into one shared library an artifact ships.

The library is plain C ABI (`llmc_sgemm_nt`, `llmc_sgemm_supported`, `llmc_attention_f32`, and
`llmc_sgemm_nt_packed` with its packing of W, `llmc_sgemm_pack_w`, `llmc_sgemm_packed_floats`),
loaded by the runtime through ctypes (runtime/cpu_gemm.py, runtime/cpu_attention.py): no TVM,
no torch. It is built with the host's C++ compiler, the one TVM already needs to link a CPU
artifact's kernels, for x86-64 only (its kernels are AVX-512 intrinsics; the runtime checks the
processor before every use and falls back to numpy where it lacks AVX-512F/VL). Builds are
cached under ``$LLMC_CACHE_DIR/cpu_gemm`` (default ``~/.cache/llmc``), keyed by a hash of the
sources, the flags and the compiler's version.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from ...errors import LLMCError

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = (HERE / "llmc_sgemm.cc", HERE / "llmc_attention.cc")
HEADERS = (HERE / "llmc_pool.h",)
LIB_NAME = "libllmc_sgemm.so"
ARTIFACT_FILE = "gemm.so"  # its name inside an artifact (manifest libraries role "gemm")
# -fvisibility=hidden: only the extern "C" entry points are exported; the base ISA stays
# x86-64 so the library loads anywhere and the AVX-512 code runs only after the CPU check.
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread")
# The C++ runtime linked in, its symbols kept private: the library then needs only libc, so an
# artifact built with a new g++ loads where the system's libstdc++ is older. Where the compiler
# has no static libstdc++, the library links it dynamically instead.
EXPORTS = "{ global: llmc_*; local: *; };\n"
STATIC = ("-static-libstdc++", "-static-libgcc", "-Wl,--exclude-libs,ALL")


class GemmBuildError(LLMCError):
    pass


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLMC_CACHE_DIR", pathlib.Path.home() / ".cache" / "llmc")) / "cpu_gemm"


def build_gemm_library() -> pathlib.Path:
    """The library's path in the cache, compiled on first use."""
    cxx = compiler()
    if cxx is None:
        raise GemmBuildError("no C++ compiler (g++ or $CXX) to build llmc's CPU kernel library")
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.read_bytes())
    h.update(" ".join(FLAGS + STATIC + (EXPORTS,)).encode())
    h.update(_version(cxx).encode())
    out = cache_dir() / h.hexdigest()[:16] / LIB_NAME
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = pathlib.Path(tmp) / LIB_NAME
        exports = pathlib.Path(tmp) / "exports.map"  # the llmc_* entry points, nothing else (not
        exports.write_text(EXPORTS)                   # the std:: templates its kernels instantiate)
        script = f"-Wl,--version-script={exports}"
        for extra in ((*STATIC, script), (script,), ()):  # each fallback for a linker without it
            cmd = [cxx, *FLAGS, *extra, "-o", str(tmp_out), *map(str, SOURCES)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                break
        else:
            raise GemmBuildError(f"building llmc's CPU kernel library failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: a concurrent build never sees half a file
    return out


def gemm_library() -> pathlib.Path | None:
    """The library for a CPU artifact built here (llvm targets are this host's architecture),
    or None on a host that is not x86-64 or has no C++ compiler (then its GEMMs run in numpy's
    BLAS, as they would on a processor without AVX-512)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or compiler() is None:
        return None
    return build_gemm_library()


__all__ = ["build_gemm_library", "gemm_library", "GemmBuildError", "ARTIFACT_FILE", "LIB_NAME", "SOURCES"]
