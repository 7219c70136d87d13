"""Import TVM in runtime-only mode, without dragging in torch or the TVM compiler.

`tvm_ffi` imports torch whenever torch is installed (for DLPack interop), which costs
a second of start-up and defeats a lean serving process; we hide torch during the
import unless the host program already loaded it. The CUDA and disco plugins are not
loaded by runtime-only TVM, so they are preloaded when a GPU device is asked for.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
import sys

from .threads import use_all_cores

_PLUGINS = ("libtvm_runtime_cuda.so", "libtvm_runtime_extra.so")
skipped_plugins: dict[str, str] = {}


def import_tvm(with_gpu: bool = False):
    """TVM, imported runtime-only unless already imported (or TVM_USE_RUNTIME_LIB=0).

    A process that loads an artifact first and compiles afterwards needs
    TVM_USE_RUNTIME_LIB=0: the compiler library cannot be added once TVM is imported.
    """
    use_all_cores()
    if "tvm" in sys.modules:  # the compiler (or the user) already imported TVM
        return sys.modules["tvm"]
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
    try:
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so globally)

        spec = importlib.util.find_spec("tvm")
        if spec is None or spec.origin is None:
            raise ImportError("TVM is not installed (pip install apache-tvm==0.27.0.post1)")
        lib = pathlib.Path(spec.origin).parent / "lib"
        ctypes.CDLL(str(lib / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
        if with_gpu:
            for name in _PLUGINS:
                try:
                    ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
                except OSError as e:  # e.g. no libcuda.so.1 on a CPU host
                    skipped_plugins[name] = str(e)
        import tvm
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm
