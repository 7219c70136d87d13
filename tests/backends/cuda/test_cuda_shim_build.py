"""The CUDA shim compiles with nvcc (no GPU needed) and loads through TVM's runtime as a
TVM-FFI library; calls with host tensors fail with a clear error instead of crashing."""
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"), reason="nvcc not installed")


@pytest.fixture(scope="module")
def lib_sm90(build_mod):
    return build_mod.build_shim(arch="sm_90")


@needs_nvcc
def test_builds_for_sm90_and_exports_ffi_functions(build_mod, lib_sm90, tvm_gpu):
    assert lib_sm90.exists() and lib_sm90.stat().st_size > 0
    mod = tvm_gpu.runtime.load_module(str(lib_sm90))
    for name in build_mod.EXPORTED:
        assert mod.implements_function(name), name
    # the cache hands back the same file without recompiling
    assert build_mod.build_shim(arch="sm_90") == lib_sm90


@needs_nvcc
@pytest.mark.slow
def test_builds_for_sm80(build_mod, tmp_path):
    # Every source compiles and links for Ampere (its arch guards, no Hopper-only instruction left
    # unguarded), with device code unoptimised (-G): the optimised build of the same sources is the
    # sm_90 one above, and optimising all of them a second time cost ~6 CPU minutes of the test run.
    out = build_mod.build_shim(tmp_path / "libllmc_shim_sm80.so", arch="sm_80", extra_flags=("-G",))
    assert out.exists() and out.stat().st_size > 0
    assert b"sm_80" in out.read_bytes()  # the fatbin holds Ampere code


@needs_nvcc
def test_concurrent_builders_of_one_entry_build_it_once(build_mod, tmp_path, monkeypatch):
    """Two builders of the same cache entry (parallel test workers, two compiles at once): one
    compiles, the other waits on the entry's lock and takes its library."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path))
    builds = []
    compile_all = build_mod._compile_all
    monkeypatch.setattr(build_mod, "_compile_all", lambda *a, **k: builds.append(1) or compile_all(*a, **k))
    with ThreadPoolExecutor(2) as pool:
        libs = list(pool.map(lambda _: build_mod.build_shim(sources=("llmc_argmax.cu",)), range(2)))
    assert libs[0] == libs[1] and libs[0].stat().st_size > 0
    assert len(builds) == 1


@needs_nvcc
def test_a_failing_compile_names_its_source(build_mod, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path))
    with pytest.raises(build_mod.ShimBuildError, match="llmc_argmax.cu"):
        build_mod.build_shim(sources=("llmc_argmax.cu",), extra_flags=("--no-such-nvcc-flag",))
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


@needs_nvcc
def test_host_tensors_are_rejected(lib_sm90, tvm_gpu):
    mod = tvm_gpu.runtime.load_module(str(lib_sm90))
    a = tvm_gpu.runtime.tensor(np.zeros((4, 8), "float16"))
    b = tvm_gpu.runtime.tensor(np.zeros((8, 4), "float16"))
    c = tvm_gpu.runtime.tensor(np.zeros((4, 4), "float16"))
    with pytest.raises(ValueError, match="CUDA tensor"):
        mod["llmc_gemm"](a, b, c)
    with pytest.raises(ValueError, match="CUDA tensor"):
        mod["llmc_gemm_ex"](a, b, None, None, c, 0, 0)
    q = tvm_gpu.runtime.tensor(np.zeros((1, 2, 4, 64), "float16"))
    with pytest.raises(ValueError, match="CUDA tensor"):
        mod["llmc_attention"](q, q, q, q, 0.125, 1)
    info = mod["llmc_shim_info"]()
    assert "cublasLt" in info


def _check_declarations(tmp_path, env: str, header: str, check: str) -> None:
    """Compile a static_assert file of the shim's hand-written ABI values against the real
    header in $env, where it exists."""
    inc = os.environ.get(env)
    if not inc or not os.path.exists(os.path.join(inc, header)):
        pytest.skip(f"no {header} here (set {env})")
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    shim_dir = HERE.parents[2] / "backends" / "cuda" / "shim"
    subprocess.run([nvcc, "-std=c++17", f"-I{shim_dir}", f"-I{inc}", "-c", str(HERE / check),
                    "-o", str(tmp_path / "chk.o")], check=True)


def test_cublaslt_declarations_match_headers(tmp_path):
    """The hand-written cuBLASLt ABI values agree with the real headers, where those exist
    (LLMC_CUBLAS_INCLUDE=<dir with cublasLt.h>, e.g. from the nvidia-cublas wheel)."""
    _check_declarations(tmp_path, "LLMC_CUBLAS_INCLUDE", "cublasLt.h", "cublaslt_decl_check.cu")


def test_cusparselt_declarations_match_headers(tmp_path):
    """Same for cuSPARSELt (LLMC_CUSPARSELT_INCLUDE=<dir with cusparseLt.h>, e.g. from the
    nvidia-cusparselt-cu13 wheel)."""
    _check_declarations(tmp_path, "LLMC_CUSPARSELT_INCLUDE", "cusparseLt.h", "cusparselt_decl_check.cu")


def test_cuda_graph_module_imports_without_gpu(cuda_graph_mod):
    try:
        rt = cuda_graph_mod.cudart()
    except cuda_graph_mod.CudaError:
        pytest.skip("no libcudart here")
    assert rt is not None
    n = __import__("ctypes").c_int(-1)
    err = rt.cudaGetDevice(__import__("ctypes").byref(n))
    if err != 0:  # no driver / no GPU: the helper reports the CUDA error
        with pytest.raises(cuda_graph_mod.CudaError):
            cuda_graph_mod.Stream(0)
