"""Store each float32 GEMM weight [K, N] as its transpose [N, K], read through a (1, 0) permute.

llmc's CPU GEMM (backends/cpu_gemm/llmc_sgemm.cc) multiplies by W^T with both operands
K-contiguous: per output element a dot product of two rows, which needs no packing of W at
compile time or per call. Weights already stored [N, K] (torch Linear weights once the frontend's
permute is kept, a tied embedding read as the LM head) are left as they are; a [K, N] weight
(GPT-2's Conv1D, a weight that constant folding transposed) becomes one, with the permute in
front so the graph computes the same values. The GEMM grouping then reads it with trans_b (see
backends/cpu_blas.py); numpy's BLAS reads such a W^T as fast as W.

Only weights that nothing but MATMULs read, as their right operand, move: any other reader
would see a different layout. 2:4-pruned weights keep theirs (their flag describes it).
Pure: Graph -> Graph; the params gain the transposed arrays under new names (`<name>.T`, or
`<name>` for a `<name>.T`: simplify.transposed_name) and lose the old ones.
"""
from __future__ import annotations

import weakref

import numpy as np

from ..compiler import ir
from ..compiler.dtypes import DType
from ..compiler.ir import Graph, Node, TensorType
from ..compiler.ops import Op, PermuteAttrs
from .quantize import _unique
from .report import PassReport
from .rewrite import substitute
from .simplify import transposed_name


def _gemm_only(w: Node, users: list[Node]) -> bool:
    return bool(users) and all(u.op is Op.MATMUL and u.inputs[1] is w and u.inputs[0] is not w for u in users)


# source array id -> (a weak reference to it, its transpose). A generation artifact's forward and
# step function are built from the same weight arrays (a tensor-parallel compile: the same shards);
# each build transposing its own copy held two of every GEMM weight on the build host (5.6 GB more
# at the 8B shape's rank 0). An entry goes when its source array does.
_TRANSPOSED: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def _transposed(a: np.ndarray) -> np.ndarray:
    key = id(a)
    hit = _TRANSPOSED.get(key)
    if hit is not None and hit[0]() is a:
        return hit[1]
    t = np.ascontiguousarray(a.T)
    t.flags.writeable = False  # shared between programs: nobody writes a weight in place
    _TRANSPOSED[key] = (weakref.ref(a, lambda _, k=key: _TRANSPOSED.pop(k, None)), t)
    return t


def transpose_gemm_weights(graph: Graph, dtypes: frozenset = frozenset({DType.F32})) -> tuple[Graph, PassReport]:
    """`dtypes`: the weights' dtypes that move (float32 for the CPU GEMM; CUDA moves its half-precision
    weights for the decode GEMV, backends/cuda/fused_gemm.py)."""
    users = graph.users()
    outputs = {o.uid for o in graph.outputs}
    params = dict(graph.params)
    mapping: dict[int, Node] = {}
    for w in graph.nodes():
        if (w.op is not Op.WEIGHT or w.type.rank != 2 or w.dtype not in dtypes or w.uid in outputs
                or w.attrs.sparse24 or w.attrs.name not in params or not _gemm_only(w, users.get(w.uid, []))):
            continue
        k, n = w.shape
        arr = _transposed(np.asarray(params[w.attrs.name]))
        name = transposed_name(w.attrs.name)
        if name in params and not (params[name].shape == arr.shape and np.array_equal(params[name], arr)):
            name = _unique(name, params)  # the name holds another array: a fresh one
        params[name] = arr
        wt = ir.weight_node(name, TensorType((n, k), w.dtype), gemm_rows=True)
        mapping[w.uid] = ir.node(Op.PERMUTE, [wt], PermuteAttrs((1, 0)), w.where)
    out = substitute(graph, mapping, params) if mapping else graph
    return out, PassReport("transpose_gemm_weights", {"transposed": len(mapping)},
                           [f"{len(mapping)} GEMM weights stored [N, K]"])


__all__ = ["transpose_gemm_weights"]
