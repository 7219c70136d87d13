"""Build a Program's kernels for CUDA: TVM kernels as an embedded fatbin, plus the llmc shim.

    ex = build_kernels(program.kernels, parse_target("cuda:sm_90"))
    ex.export_library(".../kernels.so")    # also writes shim.so beside it
    manifest = ex.update_manifest(manifest)

Per kernel, `backends/cuda/routes.py` decides the route: a GEMM or attention core becomes
one call into the shim (cuBLASLt / flash attention, `shim.so` in the artifact, prebuilt by
nvcc for the arch); everything else is lowered by `lower.py`, scheduled with dlight
(`gpu_schedule.py`) and compiled by nvcc into a fatbin inside `kernels.so`, so loading the
artifact needs TVM's runtime alone (no NVRTC, no nvcc).

Why a stub driver: TVM's CUDA codegen hands the code to the CUDA runtime plugin
(`libtvm_runtime_cuda.so`), which compiles it through `tvm_callback_cuda_compile` at build
time; when the plugin cannot load (no `libcuda.so.1`, as on a build host without a GPU)
TVM silently keeps CUDA *source* in the module instead. So before compiling, the plugin is
loaded with RTLD_GLOBAL against the real driver if there is one, else against a stub
`libcuda.so.1` built here with gcc (cached; every entry point returns an error; it is never
put on a loader path). The compile callback is overridden for the build's duration to run
nvcc for the requested arch (SASS + PTX for newer GPUs).

Arena views: the GPU executor passes temporaries as views into one arena allocation, whose
DLTensor carries a byte_offset; a TVM function with a constant elem_offset rejects that, so
every buffer parameter gets a symbolic elem_offset (`_offset_params`).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pathlib
import shutil
import subprocess
import time
from typing import Callable, Mapping

import tvm
import tvm_ffi

from llmc.compiler.program import Kernel
from llmc.errors import LLMCError, TargetError

from .gpu_schedule import assert_device_code, schedule_gpu_func
from .lower import describe_kernel, lower_kernel
from .targets import TargetSpec

SHIM_FILE = "shim.so"
_STUB_SYMBOLS = ("cuDeviceGetName cuFuncSetAttribute cuGetErrorName cuGetErrorString cuLaunchKernelEx "
                 "cuModuleGetFunction cuModuleLoadData cuModuleUnload cuTensorMapEncodeTiled cuLaunchKernel "
                 "cuModuleGetGlobal cuLaunchCooperativeKernel cuInit cuDriverGetVersion cuCtxGetCurrent "
                 "cuCtxSetCurrent cuDevicePrimaryCtxRetain cuPointerGetAttribute").split()


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLMC_CACHE_DIR", pathlib.Path.home() / ".cache" / "llmc"))


# ---- the CUDA runtime plugin, loaded in-process ---------------------------------------------
def _stub_libcuda() -> pathlib.Path:
    out = cache_dir() / "cuda_stub" / "libcuda.so.1"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / "libcuda_stub.c"
    src.write_text("/* build-host stand-in for the NVIDIA driver: every call fails (100 = no device) */\n"
                   + "".join(f"int {s}(void) {{ return 100; }}\n" for s in _STUB_SYMBOLS))
    tmp = out.with_name(f".libcuda.so.1.{os.getpid()}")
    r = subprocess.run([os.environ.get("CC", "gcc"), "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp),
                        str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise TargetError(f"building the stub libcuda.so.1 for CUDA builds failed (needs gcc): {r.stderr[:400]}")
    os.replace(tmp, out)
    return out


def ensure_cuda_plugin() -> str:
    """Load TVM's CUDA runtime plugin into this process (so CUDA builds embed a fatbin).

    Returns "present" (already loaded), "driver" (loaded against the real driver) or "stub".
    """
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return "present"
    how = "driver"
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_stub_libcuda()), mode=ctypes.RTLD_GLOBAL)
        how = "stub"
    lib = pathlib.Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise TargetError(f"cannot load TVM's CUDA plugin {lib.name} ({e}); CUDA builds need the CUDA 13 runtime "
                          f"(libcudart.so.13, from the CUDA toolkit or pip's nvidia-cuda-runtime) on the loader "
                          f"path") from None
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise TargetError(f"{lib.name} loaded but registered no CUDA module loader")
    return how


def gencode_flags(arch: str) -> list[str]:
    n = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{n},code=[sm_{n},compute_{n}]"]


@contextlib.contextmanager
def _nvcc_callback(arch: str, log: list):
    """Make `tvm_callback_cuda_compile` run nvcc -> fatbin for `arch` while building."""
    from tvm.support import nvcc

    old = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_cuda(code):
        t = time.perf_counter()
        out = nvcc.compile_cuda(code, target_format="fatbin", arch=gencode_flags(arch), compiler="nvcc")
        log.append(time.perf_counter() - t)
        return out

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    try:
        yield
    finally:
        if old is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", old, override=True)


# ---- lowering tweaks for the GPU executor -----------------------------------------------------
def _offset_params(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """Give every buffer parameter a symbolic elem_offset, so arena views (a DLTensor with a
    byte_offset) are accepted; TVM 0.27's Python API cannot rebuild a buffer type, so the
    serialized function is edited (as lower._relax_alignment does)."""
    j = json.loads(tvm.ir.save_json(func))
    nodes = j["nodes"]
    root = nodes[j["root_index"]]
    for vi in nodes[root["data"]["params"]]["data"]:
        p = nodes[vi]
        ty = nodes[p["data"]["ty"]]
        if ty["type"] != "tirx.BufferType":
            continue
        name = nodes[p["data"]["name"]]["data"] if "name" in p["data"] else f"p{vi}"
        nodes.append({"type": "ffi.String", "data": f"{name}_elem_offset"})
        nodes.append({"type": "ir.PrimType", "data": {"span": 0, "dtype": "int64"}})
        nodes.append({"type": "ir.Var", "data": {"span": 0, "ty": len(nodes) - 1, "name": len(nodes) - 2}})
        ty["data"]["elem_offset"] = len(nodes) - 1
    return tvm.ir.load_json(json.dumps(j))


def cuda_target(spec: TargetSpec) -> tvm.target.Target:
    # 48 KiB: dlight's rules assume the default dynamic shared-memory limit
    return tvm.target.Target({"kind": "cuda", "arch": spec.arch, "max_shared_memory_per_block": 49152,
                              "max_threads_per_block": 1024, "thread_warp_size": 32})


# ---- the executable ---------------------------------------------------------------------------
class CudaExecutable:
    """TVM kernels (fatbin inside `mod`) + the shim library + the per-kernel routes."""

    def __init__(self, mod, spec: TargetSpec, routes: dict, labels: dict, shim_path: pathlib.Path | None,
                 timings: dict):
        self.mod = mod
        self.spec = spec
        self.routes = routes  # kernel name -> Route (shim) ; absent: TVM
        self.labels = labels  # kernel name -> "tvm <rule>" / route label
        self.shim_path = shim_path
        self.timings = timings

    def export_library(self, file: str) -> None:
        if self.mod is not None:
            self.mod.export_library(file)
        else:  # every kernel runs in the shim: an empty host library keeps the artifact layout
            tvm.compile(tvm.IRModule({}), target={"kind": "llvm"}).export_library(file)
        if self.shim_path is not None:
            shutil.copy2(self.shim_path, pathlib.Path(file).parent / SHIM_FILE)

    def update_manifest(self, manifest: dict) -> dict:
        program = dict(manifest["program"])
        kernels = {}
        for name, entry in program["kernels"].items():
            r = self.routes.get(name)
            kernels[name] = {**entry, **(r.to_json() if r is not None else {"route": "tvm"}),
                             "schedule": self.labels.get(name, "")}
        program["kernels"] = kernels
        roles = {"tvm": "kernels.so", **({"shim": SHIM_FILE} if self.shim_path is not None else {})}
        return dict(manifest, program=program, libraries={"version": 1, "roles": roles},
                    cuda={"version": 1, "arch": self.spec.arch, "fatbin": True})


def _fits_int32(kernel: Kernel, symbols: Mapping | None) -> bool:
    """Every buffer of the kernel has < 2**31 elements at the symbols' upper bounds."""
    if symbols is None:
        return False
    from llmc.compiler.symbolic import to_json
    from llmc.runtime.manifest import eval_dim

    hi = {name: s.hi for name, s in symbols.items()}
    try:
        for n in (*kernel.params, *kernel.outputs):
            count = 1
            for d in n.shape:
                count *= eval_dim(to_json(d), hi)
            if count >= 2 ** 31:
                return False
    except KeyError:
        return False
    return True


def build_kernels(kernels: Mapping[str, Kernel], spec: TargetSpec, *, use_shim: bool = True,
                  progress: Callable[[str], None] | None = None, symbols: Mapping | None = None) -> CudaExecutable:
    """Route, lower, schedule and compile every kernel for `spec` (kind cuda).

    `symbols` (name -> SymDim): with their upper bounds known, kernels whose buffers all have
    < 2**31 elements get 32-bit index math (ForceNarrowIndexToInt32: about 2x on SwiGLU)."""
    from .collective_route import match_runtime_comm
    from .cuda.routes import match_route

    if spec.kind != "cuda":
        raise TargetError(f"build_cuda builds kind 'cuda', got {spec.kind!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    how = ensure_cuda_plugin()
    routes, labels, funcs = {}, {}, {}
    target = cuda_target(spec)
    with target:
        for name, k in kernels.items():
            route = match_runtime_comm(k) or (match_route(k) if use_shim else None)
            if route is not None:
                routes[name] = route
                labels[name] = route.label
                continue
            f = _offset_params(lower_kernel(k))
            try:
                f = schedule_gpu_func(f, target, name=name)
            except LLMCError as e:
                raise LLMCError(f"kernel {name} ({describe_kernel(k)}): {e}") from None
            labels[name] = f"tvm {schedule_gpu_func.last_rule}"
            f = f.with_attr("global_symbol", name)
            if _fits_int32(k, symbols):
                try:
                    f = tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({name: f}))[name]
                    labels[name] += " i32"
                except Exception:  # noqa: BLE001 - keep 64-bit indices
                    pass
            funcs[name] = f
    timings["schedule_s"] = time.perf_counter() - t0
    if progress:
        progress(f"cuda {spec.arch}: {len(routes)} kernels to the shim, {len(funcs)} to TVM (plugin: {how})")
    mod = None
    if funcs:
        t = time.perf_counter()
        nvcc_log: list = []
        with _nvcc_callback(spec.arch, nvcc_log), target:
            mod = tvm.compile(tvm.IRModule(funcs), target=target)
        assert_device_code(mod, f"{len(funcs)} CUDA kernels")
        if not any(m.kind == "cuda" for m in mod.mod.imports) or not nvcc_log:
            raise LLMCError("the CUDA build kept CUDA source instead of a fatbin (TVM's CUDA plugin did not "
                            "compile it); the artifact would need a compiler to load")
        timings["tvm_compile_s"] = time.perf_counter() - t
        timings["nvcc_s"] = sum(nvcc_log)
    shim_path = None
    if routes:
        t = time.perf_counter()
        shim_path = build_shim_for(spec.arch)
        timings["shim_s"] = time.perf_counter() - t
    return CudaExecutable(mod, spec, routes, labels, shim_path, timings)


def build_shim_for(arch: str) -> pathlib.Path:
    """The shim for `arch` (nvcc, cached by source hash under the llmc cache dir)."""
    from .cuda.build_shim import build_shim

    return build_shim(arch=arch)


# ---- the CUDA program: CUDA-specific grouping ------------------------------------------------
def build_program(graph, passes=None, verify_each: bool = False, dump_dir=None, fuse_gemv: bool = True):
    """passes.pipeline.build_program with the CUDA grouping (see backends/cuda/routes.py). With
    `fuse_gemv` (the shim runs the GEMMs, weights are the build's to lay out), half-precision GEMM
    weights are stored [N, K] and the norms and SwiGLUs around GEMMs join them (cuda/fused_gemm.py)."""
    import functools

    from llmc.compiler.dtypes import DType
    from llmc.passes.gemm_weight_layout import transpose_gemm_weights
    from llmc.passes.pipeline import DEFAULT_PIPELINE
    from llmc.passes.pipeline import build_program as build

    from .cuda.routes import cuda_grouping, prepare_graph

    def prepare(g):
        g, n_attn = prepare_graph(g)
        note = f"CUDA grouping; {n_attn} attentions read token-major q/k/v"
        if fuse_gemv:
            g, report = transpose_gemm_weights(g, frozenset({DType.F16, DType.BF16}))
            note += f"; {report.lines[0]}"
        return g, note

    return build(graph, DEFAULT_PIPELINE if passes is None else passes, verify_each, dump_dir,
                 grouping=functools.partial(cuda_grouping, fuse_gemv=fuse_gemv), prepare=prepare,
                 grouping_name="cuda_grouping")


__all__ = ["build_kernels", "build_program", "CudaExecutable", "ensure_cuda_plugin", "SHIM_FILE"]
