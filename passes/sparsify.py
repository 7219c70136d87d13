"""sparsify: 2:4 structured sparsity of the matmul weights the quantize pass targets.

In every group of 4 consecutive input channels (along K) of each output row of W [N, K],
2 weights become exactly 0: the layout sparse tensor cores (and cuSPARSELt) accelerate.
The targets are the quantize pass's (passes/quantize.py `find_targets`: a 2-D float weight
read by a MATMUL; not a weight shared with an embedding, not the LM head), so `--sparsity
2:4 --quant int4` prunes and then quantizes the same matmuls; RTN and AWQ keep exact zeros
exact (zero lies on every int4 grid), GPTQ would fill them in and is refused with sparsity.

Methods:
- magnitude: keep the 2 largest |w| of each group of 4.
- sparsegpt (Frantar & Alistarh, 2023): with H = X^T X of the matmul's calibration inputs
  (passes/quant/calibrate.py) and U the upper Cholesky factor of H^-1, columns are walked in
  order; at the first column of each group of 4 the 2 weights with the smallest w^2 / U[j,j]^2
  (the output error of removing them, given the updates so far) are pruned, and every
  column's change (pruned to 0, or kept) is compensated on the columns not yet visited, as
  GPTQ does for rounding. Kept weights therefore move; pruned ones are exactly 0.

The pruned weight is a new WEIGHT (`<name>.sparse24`, its attrs' `sparse24` set), so the pass
stays pure and a weight some other op reads keeps its dense values there. The CPU kernels
compute the zeros; the CUDA backend routes a bfloat16 matmul over such a weight to
cuSPARSELt's sparse tensor cores (backends/cuda/shim/llmc_sparse24.cu).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..compiler import ir
from ..compiler.ir import Graph, Node
from ..errors import LLMCError
from .quantize import _unique, _weight_nk, find_targets
from .report import PassReport
from .rewrite import substitute

SPARSITY_METHODS = ("magnitude", "sparsegpt")
KEEP, BLOCK = 2, 4  # 2:4


@dataclass(frozen=True)
class SparsityScheme:
    """2:4 along K of every quantize-pass target; `method` magnitude or sparsegpt (calibrated)."""

    pattern: str = "2:4"
    method: str = "magnitude"
    calib_samples: int = 32  # token windows read from the calibration text (sparsegpt)
    calib_window: int = 128
    damp: float = 0.01  # sparsegpt: dampening, a fraction of the mean Hessian diagonal
    quantize_lm_head: bool = False  # (find_targets' name) prune the LM head too

    def __post_init__(self) -> None:
        if self.pattern != "2:4":
            raise LLMCError(f"sparsity pattern {self.pattern!r} is not supported; 2:4 is (2 of every 4 input "
                            f"channels kept)")
        if self.method not in SPARSITY_METHODS:
            raise LLMCError(f"unknown sparsity method {self.method!r}; choose one of {', '.join(SPARSITY_METHODS)}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise LLMCError(f"--calib-samples must be a positive integer, got {self.calib_samples!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "sparsegpt"


def magnitude_24(w: np.ndarray) -> np.ndarray:
    """w [N, K] with the 2 smallest |w| of each group of 4 along K set to 0."""
    n, k = w.shape
    g = np.array(w, copy=True).reshape(n, k // BLOCK, BLOCK)
    drop = np.argsort(np.abs(g), axis=-1, kind="stable")[..., :BLOCK - KEEP]
    np.put_along_axis(g, drop, 0, axis=-1)
    return g.reshape(n, k)


def sparsegpt_24(w: np.ndarray, h: np.ndarray, damp: float = 0.01, block: int = 128) -> np.ndarray:
    """w [N, K] pruned to 2:4 with error compensation through the inverse Hessian h = X^T X."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    n, k = w.shape
    dead = np.diag(h) == 0  # inputs never active: their weights are free, make them 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(np.linalg.cholesky(h))
    u = np.linalg.cholesky(hinv.T @ hinv).T  # upper factor of H^-1
    d = np.diag(u)
    block -= block % BLOCK
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].copy()
        err = np.empty_like(wb)
        pruned = np.zeros(wb.shape, bool)
        for i in range(b1 - b0):
            j = b0 + i
            if i % BLOCK == 0:
                cost = wb[:, i:i + BLOCK] ** 2 / d[j:j + BLOCK] ** 2
                drop = np.argsort(cost, axis=1, kind="stable")[:, :BLOCK - KEEP]
                np.put_along_axis(pruned[:, i:i + BLOCK], drop, True, axis=1)
            col = wb[:, i]
            new = np.where(pruned[:, i], 0.0, col)
            e = (col - new) / u[j, j]
            wb[:, i + 1:] -= np.outer(e, u[j, j + 1:b1])
            wb[:, i] = new
            err[:, i] = e
        w[:, b0:b1] = wb
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return w


def sparsify_weights(graph: Graph, scheme: SparsityScheme, calibration: Sequence[np.ndarray] = (),
                     progress: Callable[[str], None] | None = None) -> tuple[Graph, PassReport]:
    """The pass itself (see the module docstring); `calibration`: token-id windows [T] (sparsegpt)."""
    from .quant.calibrate import collect

    targets, kept = find_targets(graph, scheme)
    bad = [f"{t.mm.where or t.name} (K={int(t.mm.inputs[0].shape[-1])})" for t in targets
           if int(t.mm.inputs[0].shape[-1]) % BLOCK]
    if bad:
        raise LLMCError(f"2:4 sparsity needs every pruned matmul's input size K to be a multiple of 4: {', '.join(bad[:4])}")
    if scheme.needs_calibration and not len(calibration):
        raise LLMCError("--method sparsegpt needs calibration windows (--calib FILE)")
    stats = collect(graph, [t.mm for t in targets], calibration, progress) if scheme.needs_calibration else {}
    params = dict(graph.params)
    mapping: dict[int, Node] = {}
    zeros = total = 0
    for i, t in enumerate(targets):
        if progress and scheme.method == "sparsegpt":
            progress(f"pruning (sparsegpt) {i + 1}/{len(targets)}: {t.mm.where or t.name}")
        w = _weight_nk(graph, t)
        pruned = sparsegpt_24(w, stats[t.mm.uid].hessian, scheme.damp) if scheme.method == "sparsegpt" \
            else magnitude_24(w)
        stored = pruned.astype(t.weight.dtype.numpy)
        stored = stored if t.transposed else stored.T  # back to the weight's own layout
        name = _unique(f"{t.name}.sparse24", params)
        params[name] = np.ascontiguousarray(stored)
        new_w = ir.weight_node(name, t.weight.type, sparse24=True)
        right = ir.node(t.mm.inputs[1].op, [new_w], t.mm.inputs[1].attrs, t.mm.inputs[1].where) \
            if t.transposed else new_w
        mapping[t.mm.uid] = ir.node(t.mm.op, [t.mm.inputs[0], right, *t.mm.inputs[2:]], t.mm.attrs, t.mm.where)
        zeros += int((stored == 0).sum())
        total += stored.size
    out = substitute(graph, mapping, params)
    lines = [f"pruned {len(targets)} matmuls to 2:4 ({scheme.method}): {zeros} of {total} weights zero"
             f" ({100 * zeros / max(total, 1):.1f}%)"]
    if kept:
        lines.append(f"kept dense {len(kept)} ({', '.join(sorted({why for _, why in kept}))})")
    return out, PassReport("sparsify", {"pruned": len(targets), "kept": len(kept), "zeros": zeros,
                                        "weights": total}, lines)


def sparsify(scheme: SparsityScheme, calibration: Sequence[np.ndarray] = (),
             progress: Callable[[str], None] | None = None):
    """The pass for a pipeline: Graph -> (Graph, PassReport) with the scheme bound."""
    def sparsify(graph: Graph) -> tuple[Graph, PassReport]:
        return sparsify_weights(graph, scheme, calibration, progress)
    return sparsify


__all__ = ["sparsify", "sparsify_weights", "SparsityScheme", "SPARSITY_METHODS", "magnitude_24", "sparsegpt_24"]
