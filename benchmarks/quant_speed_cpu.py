"""CPU speed of the quantized matmul kernels against the float GEMM, in the same run.

    python benchmarks/quant_speed_cpu.py [--k 2048] [--n 2048] [--reps 20]

One matmul y = x @ W (W a [K, N] fp32 weight) is compiled three ways with llmc's CPU
backend: fp32 (the BLAS route, numpy's OpenBLAS), int8 and int4 g128 (Op.QMATMUL, TVM
kernels dequantizing each [K, nt] weight panel inside the GEMM tile). Each is timed through
the runtime's Executor at M = 1 (a decode step: reading the weights is the cost) and
M = 128 (prefill-like), median of `--reps` calls after a warm-up; the ratio is fp32 / quantized.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from llmc.api import CompileOptions, compile_graph
from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, sym, weight_node
from llmc.compiler.ops import Op
from llmc.compiler.symbolic import SymDim
from llmc.passes.quant import QuantScheme
from llmc.passes.quantize import quantize


def graph(k: int, n: int) -> Graph:
    rng = np.random.default_rng(0)
    x = input_node("x", TensorType((1, sym("seq"), k), DType.F32))
    w = weight_node("proj.weight", TensorType((k, n), DType.F32))
    y = ir.node(Op.RELU, [ir.node(Op.MATMUL, [x, w], where="proj")])  # not an output by itself (no lm_head rule)
    return Graph((x,), (y,), {"proj.weight": (rng.standard_normal((k, n)) * 0.02).astype(np.float32)},
                 {"seq": SymDim("seq", 1, 256)})


def timed(cm, x, reps: int) -> float:
    cm(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        cm(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    g = graph(a.k, a.n)
    models = {"fp32 (blas)": compile_graph(g, CompileOptions(), passes=[])}
    for label, scheme in (("int8", QuantScheme("int8")), ("int4 g128", QuantScheme("int4", 128))):
        models[label] = compile_graph(g, CompileOptions(), passes=[quantize(scheme)])
    rng = np.random.default_rng(1)
    print(f"y = x @ W, K={a.k}, N={a.n}; median of {a.reps}")
    for m in (1, 128):
        x = rng.standard_normal((1, m, a.k)).astype(np.float32)
        ref = models["fp32 (blas)"](x)[0]
        base = None
        for label, cm in models.items():
            t = timed(cm, x, a.reps)
            base = base or t
            err = np.abs(cm(x)[0] - ref).max() / np.abs(ref).max()
            print(f"M={m:4d} {label:12s} {t * 1e3:8.3f} ms  fp32/this {base / t:5.2f}x  (rel. max diff vs fp32 {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
