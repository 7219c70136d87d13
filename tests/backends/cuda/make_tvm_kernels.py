"""Build a tiny TVM CUDA kernel library (a compiled fatbin) for the GPU tests of the shim and
of runtime/cuda_graph.py, on a machine without a GPU.

    LD_LIBRARY_PATH=<dir with a stub libcuda.so.1> TVM_CUDA_COMPILE_MODE=nvcc \
        python tests/backends/cuda/make_tvm_kernels.py build/cuda_shim/tvm_kernels.so

(the stub lets TVM's CUDA plugin load so it compiles at build time; see
shared/docs/tvm-0.27-notes.md section 4.2). Exports `add_one(x, y)`: y = x + 1 over a float32
vector of any length.
"""
import sys

import tvm
from tvm import te, tirx
from tvm.s_tir import dlight as dl


def build(out: str, arch: str = "sm_90") -> str:
    n = tirx.Var("n", "int64")
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: x[i] + tirx.const(1.0, "float32"), name="y")
    f = te.create_prim_func([x, y]).with_attr("global_symbol", "add_one")
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(tvm.IRModule({"add_one": f}))
        ex = tvm.compile(mod, target=target)
    assert ex.mod.imports, "no device module (kernel was not scheduled for the GPU)"
    ex.export_library(out)
    blob = open(out, "rb").read()
    assert b"__global__" not in blob, "library holds CUDA source, not a fatbin: build with the libcuda stub"
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "build/cuda_shim/tvm_kernels.so"))
