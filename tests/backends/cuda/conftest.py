"""Fixtures for the CUDA shim tests.

GPU tests (`-m gpu`) run on the GPU machine; there the repo root is on PYTHONPATH without an
install, so the modules are imported as `backends.cuda...` / `runtime...` when `llmc.backends`
is not importable. A prebuilt shim is used when `LLMC_SHIM_LIB` names one (or
build/cuda_shim/libllmc_shim.so exists); otherwise it is built with nvcc (cached).
"""
import importlib
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _import(name: str):
    try:
        return importlib.import_module(f"llmc.{name}")
    except ImportError:
        return importlib.import_module(name)


@pytest.fixture(scope="session")
def build_mod():
    return _import("backends.cuda.build_shim")


@pytest.fixture(scope="session")
def tvm_gpu():
    return _import("runtime.tvm_runtime").import_tvm(with_gpu=True)


@pytest.fixture(scope="session")
def cuda_graph_mod():
    return _import("runtime.cuda_graph")


@pytest.fixture(scope="session")
def shim_path(build_mod):
    env = os.environ.get("LLMC_SHIM_LIB")
    if env:
        return pathlib.Path(env)
    prebuilt = ROOT / "build" / "cuda_shim" / "libllmc_shim.so"
    if prebuilt.exists() and os.environ.get("LLMC_SHIM_REBUILD") != "1":
        return prebuilt
    return build_mod.build_shim()


@pytest.fixture(scope="session")
def shim(build_mod, tvm_gpu, shim_path):
    build_mod.preload_cublaslt()
    return tvm_gpu.runtime.load_module(str(shim_path))
