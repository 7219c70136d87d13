"""CPU kernels that are one float32 ATTENTION run in llmc's CPU kernel library (route "attn").

The library's kernel (backends/cpu_gemm/llmc_attention.cc) stops each causal row at its last
visible key and keeps the score and p.v products in register tiles; TVM's attention schedule
computes every score of the square. Measured on the 2-core Zen 4 VM, GPT-2 at 4 x 128: 34-42 ms
of attention per forward in TVM, against the library's figure in benchmarks/RESULTS_CPU.md. Like
a GEMM, the attention is then alone in its kernel (backends/cpu_blas.cpu_grouping): the QKV
bias, head split and transposes before it fuse into one elementwise kernel that writes q, k and
v in the [B, H, S, D] layout the library reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Node
from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel
from llmc.compiler.symbolic import Dim, to_json
from llmc.runtime.cpu_attention import ATTENTION_FUNC, MASK_KINDS

MASK_DTYPES = {DType.BOOL: "bool", DType.F32: "float32"}


def library_attention(n: Node) -> bool:
    """n is an ATTENTION the library runs: float32 q, k, v of rank 4, a bool or float32 mask."""
    if n.op is not Op.ATTENTION or n.dtype is not DType.F32:
        return False
    q, k, v = n.inputs[:3]
    if any(x.dtype is not DType.F32 or len(x.shape) != 4 for x in (q, k, v)):
        return False
    return not n.attrs.has_mask or (n.inputs[3].dtype in MASK_DTYPES and len(n.inputs[3].shape) <= 4)


@dataclass(frozen=True)
class AttentionRoute:
    """q, k, v, [mask,] out: the call's arguments in order, with their shapes."""

    shapes: tuple[tuple[Dim, ...], ...]
    scale: float
    causal: bool
    mask: str  # "" | "bool" | "float32"

    @property
    def label(self) -> str:
        return "library attention" + (" (causal)" if self.causal else "") + (f", {self.mask} mask" if self.mask else "")

    def to_json(self) -> dict:
        return {"route": "attn", "func": ATTENTION_FUNC, "label": self.label,
                "scalars": [self.scale, int(self.causal), MASK_KINDS[self.mask]],
                "tensors": [{"arg": i, "shape": [to_json(d) for d in s]} for i, s in enumerate(self.shapes)]}


def match_attention(kernel: Kernel) -> AttentionRoute | None:
    body = [n for n in kernel.body if n.op is not Op.CONST]
    if len(body) != 1 or not library_attention(body[0]) or list(kernel.outputs) != body:
        return None
    n = body[0]
    if [p.uid for p in kernel.params] != [i.uid for i in n.inputs]:
        return None
    mask = MASK_DTYPES[n.inputs[3].dtype] if n.attrs.has_mask else ""
    return AttentionRoute(tuple(tuple(x.shape) for x in (*n.inputs, n)), float(n.attrs.scale), bool(n.attrs.causal),
                          mask)


__all__ = ["library_attention", "match_attention", "AttentionRoute"]
