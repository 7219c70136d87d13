"""Build the llmc CUDA shim (cuBLASLt GEMMs + flash attention) into a shared library.

The library exports TVM-FFI functions (`__tvm_ffi_<name>` symbols), so the TVM runtime loads it
like any kernel library::

    mod = tvm.runtime.load_module(build_shim())
    mod["llmc_gemm"](A, B, C)

Building needs nvcc and the tvm_ffi headers (shipped in the apache-tvm-ffi wheel); no GPU and
no cuBLAS headers. Builds are cached under ``$LLMC_CACHE_DIR`` (default ``~/.cache/llmc``)
keyed by a hash of the sources, the flags and the nvcc version.

Running needs the CUDA driver; the GEMMs also need ``libcublasLt.so.13`` (or .12), which the
shim dlopen's at first use. :func:`preload_cublaslt` finds it inside pip's ``nvidia-cublas``
package when it is not on the loader path.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Sequence

try:
    import fcntl
except ImportError:  # not POSIX: concurrent builders each build (the cache write stays atomic)
    fcntl = None

SHIM_DIR = pathlib.Path(__file__).resolve().parent / "shim"
SOURCES = ("llmc_gemm.cu", "llmc_attention.cu", "llmc_norm_ext.cu", "llmc_paged_attention.cu", "llmc_argmax.cu", "llmc_qgemv.cu", "llmc_gemv.cu",
           "llmc_qgemm.cu", "llmc_sparse24.cu", "llmc_allreduce.cu", "llmc_tc_gemv.cu", "llmc_paged_decode.cu")
HEADERS = ("llmc_shim_common.h", "cublaslt_decl.h", "llmc_paged.h", "llmc_lt.h", "cusparselt_decl.h", "llmc_stream_kernels.h")
LIB_NAME = "libllmc_shim.so"
EXPORTED = ("llmc_gemm", "llmc_gemm_nt", "llmc_gemm_ex", "llmc_shim_init", "llmc_shim_info",
            "llmc_attention", "llmc_attention_bshd", "llmc_attention_qkv", "llmc_attention_ext", "llmc_norm_ext", "llmc_paged_attention", "llmc_paged_attention_rope", "llmc_argmax_rows", "llmc_qgemv", "llmc_qgemv_fused", "llmc_gemm_fused", "llmc_qgemm_a8", "llmc_qgemm_stats", "llmc_gemm_sparse24", "llmc_sparse24_forget",
            "llmc_allreduce_oneshot")


class ShimBuildError(RuntimeError):
    pass


def _ffi_paths() -> tuple[list[str], str]:
    import tvm_ffi.libinfo as L

    inc = [L.find_include_path(), L.find_dlpack_include_path()]
    return list(dict.fromkeys(inc)), L.find_libtvm_ffi()


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ("/usr/local/cuda/bin/nvcc", *sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"))):
            if os.path.exists(cand):
                return cand
        raise ShimBuildError("nvcc not found (put the CUDA toolkit's bin/ on PATH)")
    return nvcc


def _gencode(archs: Sequence[str]) -> list[str]:
    """'sm_90' -> SASS for sm_90; the last arch also embeds PTX for newer GPUs."""
    flags = []
    for i, a in enumerate(archs):
        n = a.replace("sm_", "").replace("compute_", "")
        code = f"[sm_{n},compute_{n}]" if i == len(archs) - 1 else f"sm_{n}"
        flags += ["-gencode", f"arch=compute_{n},code={code}"]
    return flags


def _common_flags(archs: Sequence[str]) -> list[str]:
    return [find_nvcc(), "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr",
            *_gencode(archs)]


def compile_command(obj_path: str | os.PathLike, source: str, arch: str | Sequence[str] = "sm_90",
                    extra_flags: Sequence[str] = ()) -> list[str]:
    """nvcc -c of one shim source into an object file."""
    archs = [arch] if isinstance(arch, str) else list(arch)
    inc, _ = _ffi_paths()
    return [*_common_flags(archs), *(f"-I{p}" for p in inc), f"-I{SHIM_DIR}", "-c", str(SHIM_DIR / source),
            *extra_flags, "-o", str(obj_path)]


def link_command(out_path: str | os.PathLike, objects: Iterable[str | os.PathLike], arch: str | Sequence[str] = "sm_90",
                 extra_flags: Sequence[str] = ()) -> list[str]:
    """nvcc -shared of the objects into the shim library."""
    archs = [arch] if isinstance(arch, str) else list(arch)
    _, lib = _ffi_paths()
    # link libtvm_ffi by soname; it is already loaded in any process that imported tvm_ffi
    return [*_common_flags(archs), "-shared", *(str(o) for o in objects), f"-L{os.path.dirname(lib)}", "-ltvm_ffi",
            "-ldl", "-Xlinker", "-rpath,$ORIGIN", *extra_flags, "-o", str(out_path)]


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ShimBuildError(f"nvcc failed ({r.returncode}):\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}")


def _compile_all(tmp: pathlib.Path, arch, sources: Sequence[str], extra_flags: Sequence[str],
                 verbose: bool) -> list[pathlib.Path]:
    """Every source to an object, as many nvcc processes at once as this process has cores: nvcc
    compiles the sources of one command one after another, which made the shim a 5-7 minute
    build on one core of a 2-core machine (most of the CPU test run's CUDA share)."""
    from concurrent.futures import ThreadPoolExecutor

    objects = {s: tmp / (pathlib.Path(s).stem + ".o") for s in sources}
    # the largest sources (the most template instances) first, so the last one to start is short
    order = sorted(sources, key=lambda s: -(SHIM_DIR / s).stat().st_size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, min(len(order), cores))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(_run, compile_command(objects[s], s, arch, extra_flags), verbose) for s in order]:
            f.result()  # the first failure raises, naming its source's command and nvcc's output
    return [objects[s] for s in sources]


def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def source_hash(arch: str | Sequence[str] = "sm_90", sources: Iterable[str] = SOURCES,
                extra_flags: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    for name in (*sources, *HEADERS):
        h.update(name.encode())
        h.update((SHIM_DIR / name).read_bytes())
    h.update(repr((arch, tuple(extra_flags))).encode())
    h.update(_nvcc_version(find_nvcc()).encode())
    import tvm_ffi

    h.update(getattr(tvm_ffi, "__version__", "?").encode())
    return h.hexdigest()[:20]


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLMC_CACHE_DIR", pathlib.Path.home() / ".cache" / "llmc")) / "cuda_shim"


@contextlib.contextmanager
def _build_lock(folder: pathlib.Path):
    """One builder of a cache entry at a time (parallel test workers, concurrent compiles): the
    others wait for its library instead of compiling the same 5-minute build alongside it."""
    with open(folder / ".lock", "w") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_shim(out_path: str | os.PathLike | None = None, arch: str | Sequence[str] = "sm_90",
               sources: Iterable[str] = SOURCES, extra_flags: Sequence[str] = (),
               use_cache: bool = True, verbose: bool = False) -> pathlib.Path:
    """Compile the shim for `arch` (e.g. "sm_90", or ["sm_80", "sm_90"]) and return its path.

    With `out_path` None the library stays in the cache; otherwise it is copied there.
    """
    sources = tuple(sources)
    key = source_hash(arch, sources, extra_flags)
    cached = cache_dir() / key / LIB_NAME
    if not (use_cache and cached.exists()):
        cached.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(cached.parent):
            if not (use_cache and cached.exists()):  # another process may have built it meanwhile
                with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                    tmp_out = pathlib.Path(tmp) / LIB_NAME
                    objects = _compile_all(pathlib.Path(tmp), arch, sources, extra_flags, verbose)
                    _run(link_command(tmp_out, objects, arch, extra_flags), verbose)
                    os.replace(tmp_out, cached)  # atomic: readers never see half a file
    if out_path is None:
        return cached
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.resolve() != cached.resolve():
        shutil.copy2(cached, out)
    return out


def preload_cublaslt() -> str | None:
    """Load libcublasLt globally so the shim's dlopen by soname finds it (the runtime's loader)."""
    from llmc.runtime.gpu import preload_cublaslt as preload

    return preload()


def load_shim(path: str | os.PathLike | None = None, preload: bool = True):
    """tvm.runtime.load_module of the shim (building it for sm_90 when `path` is None)."""
    import tvm

    if preload:
        preload_cublaslt()
    return tvm.runtime.load_module(str(path if path is not None else build_shim()))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--arch", default="sm_90", help="comma-separated, e.g. sm_80,sm_90")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    archs = a.arch.split(",")
    print(build_shim(a.out, archs if len(archs) > 1 else archs[0], use_cache=not a.no_cache, verbose=a.verbose))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
