"""Learned quantization grids (from QAT): the scales a fine-tuning run settled on, given to
the quantize pass so that it stores exactly the codes the fake-quantized model used.

`llmc.quant.convert` (torch side) writes every fake-quantized weight back as a plain float
weight already on its grid, W = (q - zero) * scale, and hands over a LearnedGrid: per
weight, its scales (and zeros). The compiler never sees torch modules, and its passes
rename, transpose and concatenate weights (simplify's `.T`, merge_projections' `q+k+v`),
so the grid is looked up by *row content*, not by name: each output row of a QAT weight,
as its exact bytes, maps to that row's scales and zeros. A matmul weight of the graph is
on the learned grid when every one of its rows is found; concatenating Q/K/V only stacks
rows, so merged projections are found too. Two equal rows with different scales cannot
mislead: a row that lies exactly on a grid dequantizes to itself on any grid it was
found under, so the codes reproduce the weight either way (and `codes_for` checks that).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ...compiler.quant_layout import INT4_SYMMETRIC_ZERO
from ...errors import LLMCError
from .rtn import Quantized, quantize_codes
from .scheme import QuantScheme


@dataclass(frozen=True)
class GridEntry:
    """One QAT weight [N, K] on its grid: W = (q - zeros) * scales per group of K."""

    weight: np.ndarray  # [N, K], the float weight as the converted model holds it
    scales: np.ndarray  # [N, K // group] float32
    zeros: np.ndarray | None  # [N, K // group] integer-valued float32; None when symmetric


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()


@dataclass
class LearnedGrid:
    """The learned scales of a QAT model, keyed by its (torch) weight names.

    Pass it as `llmc.compile(model, ..., quant=grid)`: the scheme is the grid's, the method
    "qat", and every quantized matmul takes its scales from here."""

    kind: str  # "int8" | "int4"
    group: int  # int4 group size (int8: one scale per row, group = K)
    symmetric: bool
    entries: dict[str, GridEntry]
    _rows: dict | None = field(default=None, repr=False, compare=False)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.kind, self.group if self.kind == "int4" else 128, self.symmetric, method="qat")

    def _index(self) -> dict[bytes, tuple[str, int]]:
        if self._rows is None:
            self._rows = {}
            for name, e in self.entries.items():
                for r, row in enumerate(np.asarray(e.weight)):
                    self._rows.setdefault(_row_key(row), (name, r))
        return self._rows

    def covers(self, w_nk: np.ndarray) -> bool:
        """Is some row of w [N, K] (in its storage dtype) a row of a learned weight?"""
        index = self._index()
        return any(_row_key(row) in index for row in np.asarray(w_nk))

    def codes_for(self, w_nk: np.ndarray, where: str, scale_dtype) -> Quantized:
        """The codes of w [N, K] on the learned grid of its rows; an LLMCError when a row is
        not a learned row or the weight is not exactly on its grid (a model that was not
        the one llmc.quant.convert returned, or was changed after)."""
        w_nk = np.asarray(w_nk)
        index = self._index()
        found = [index.get(_row_key(row)) for row in w_nk]
        missing = sum(f is None for f in found)
        if missing:
            raise LLMCError(f"quantize (qat): {missing} of {w_nk.shape[0]} output rows of {where} have no learned "
                            f"scales: compile the model llmc.quant.convert returned (prepare_qat swaps nn.Linear "
                            f"modules only)")
        scales = np.stack([self.entries[n].scales[r] for n, r in found]).astype(scale_dtype).astype(np.float64)
        zeros = None
        if not self.symmetric and self.kind == "int4":
            zeros = np.stack([self.entries[n].zeros[r] for n, r in found]).astype(np.float64)
        group = w_nk.shape[1] if self.kind == "int8" else self.group
        if scales.shape[1] * group != w_nk.shape[1]:
            raise LLMCError(f"quantize (qat): {where} has K={w_nk.shape[1]} but its learned scales cover "
                            f"{scales.shape[1]} groups of {group}")
        w = w_nk.astype(np.float64)
        s = np.repeat(scales, group, axis=1)
        z = np.repeat(zeros, group, axis=1) if zeros is not None else None
        q = quantize_codes(w, s, z, 8 if self.kind == "int8" else 4)
        zero = z if z is not None else (INT4_SYMMETRIC_ZERO if self.kind == "int4" else 0.0)
        back = ((q - zero) * s).astype(w_nk.dtype).astype(np.float64)  # as the kernel computes it, then stored dtype
        off = float(np.max(np.abs(back - w))) if w.size else 0.0
        if off > 0:
            raise LLMCError(f"quantize (qat): {where} is not on its learned grid (largest difference {off:.3g}): "
                            f"compile the model llmc.quant.convert returned, unchanged")
        return Quantized(q.astype(np.int16), scales, zeros)


__all__ = ["LearnedGrid", "GridEntry"]
