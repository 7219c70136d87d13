"""Which CPU kernels run as BLAS GEMMs, and the grouping that gives them such kernels.

Measured on the 2-core AVX-512 build VM (benchmarks/RESULTS_CPU.md), the BLAS numpy
bundles (OpenBLAS, with kernels picked at run time for the processor it finds) beats the
TVM matmul schedules on every transformer GEMM shape: ragged N (an LM head of 50257
columns, where TVM's tiles leave a slow remainder), M = 1..16 (decode, where the GEMM is a
GEMV bound by reading the weights), and large M, where its packed, cache-blocked
microkernels run at AVX-512 rate even in a portable (x86-64-v3) artifact. So on the CPU a
float32/float64 MATMUL with a 2-D right operand (a weight, or W^T of a tied embedding read
with trans_b) is one BLAS call at run time, and TVM builds everything around it:

1. `cpu_grouping` runs `fused_grouping` with each such GEMM alone in its kernel: what
   would have been its epilogue (bias, activation, residual) fuses with its consumers
   instead (a QKV bias into the attention kernel's loads, bias + GELU into one elementwise
   pass over an output still in cache), and a W^T it reads stays with it (trans_b).
2. `match_blas(kernel)` decides, per built kernel, whether it is exactly that GEMM, and
   with which arguments; anything else is built by TVM.

The runtime (runtime/blas.py) needs only numpy, as before: no TVM compiler, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, Node
from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel
from llmc.compiler.symbolic import Dim, to_json
from llmc.passes.partition import fused_grouping, is_transposed_2d

BLAS_DTYPES = frozenset({DType.F32, DType.F64})
GEMM_FUNC = "gemm"


def _gemm_operands(m: Node) -> bool:
    """m is C = A[..., K] @ W[K, N] in one BLAS dtype."""
    if m.op is not Op.MATMUL or m.dtype not in BLAS_DTYPES:
        return False
    a, w = m.inputs
    return len(w.shape) == 2 and len(a.shape) >= 2 and a.dtype is m.dtype and w.dtype is m.dtype


def cpu_grouping(graph: Graph, attention: bool = False) -> list[list[Node]]:
    """fused_grouping with every BLAS-runnable GEMM in a kernel of its own (see passes/partition.py),
    and, with `attention` (llmc's CPU kernel library is built for this artifact), every ATTENTION
    that library runs (backends/cpu_attention.py)."""
    if not attention:
        return fused_grouping(graph, library_op=_gemm_operands)
    from .cpu_attention import library_attention

    return fused_grouping(graph, library_op=lambda n: _gemm_operands(n) or library_attention(n))


@dataclass(frozen=True)
class BlasRoute:
    """A kernel run as one GEMM: out[M, N] = a[M, K] @ (w^T if trans_b else w).

    a, w, out: (call-arg index, 2-D view shape); call args are the kernel's params then its
    outputs. The views are reshapes of contiguous buffers (leading dims flattened into M)."""

    a: tuple[int, tuple[Dim, Dim]]
    w: tuple[int, tuple[Dim, Dim]]
    out: tuple[int, tuple[Dim, Dim]]
    trans_b: int
    dtype: DType

    @property
    def label(self) -> str:
        return "blas gemm" + (" (W^T)" if self.trans_b else "")

    def to_json(self) -> dict:
        return {"route": "blas", "func": GEMM_FUNC, "label": self.label, "scalars": [self.trans_b],
                "tensors": [{"arg": i, "shape": [to_json(d) for d in shape]} for i, shape in (self.a, self.w, self.out)]}


def _rows(shape: tuple[Dim, ...]) -> Dim:
    m: Dim = 1
    for d in shape[:-1]:
        m = d * m  # int * SymExpr is SymExpr.__rmul__
    return m


def match_blas(kernel: Kernel) -> BlasRoute | None:
    body = [n for n in kernel.body if n.op is not Op.CONST]
    trans_b = 0
    if len(body) == 2 and is_transposed_2d(body[0]) and body[1].op is Op.MATMUL and body[1].inputs[1] is body[0]:
        trans_b, body = 1, body[1:]
    if len(body) != 1 or not _gemm_operands(body[0]) or list(kernel.outputs) != body:
        return None
    m = body[0]
    a, w = m.inputs
    if trans_b:
        w = w.inputs[0]
    idx = {p.uid: i for i, p in enumerate(kernel.params)}
    if a.uid not in idx or w.uid not in idx:
        return None
    k, n = m.inputs[1].shape
    rows = _rows(tuple(a.shape))
    return BlasRoute((idx[a.uid], (rows, k)), (idx[w.uid], tuple(w.shape)),
                     (len(kernel.params), (rows, n)), trans_b, m.dtype)


__all__ = ["cpu_grouping", "match_blas", "BlasRoute", "BLAS_DTYPES", "GEMM_FUNC"]
