"""Kernels that are one PAGED_ATTENTION run as the runtime's paged-attention call (route
"kv", function "paged_attention" in the manifest): the KV cache is state the runtime owns
(pages written in place, a page table that changes every step), and the work is gathers
over a ragged batch, so it is a runtime library call on the CPU, as a GEMM is a BLAS call
(runtime/engine/paged_attention.py)."""
from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel
from llmc.compiler.symbolic import Dim, to_json
from llmc.runtime.engine.kv_codec import CODEC_IDS

PAGED_FUNC = "paged_attention"


@dataclass(frozen=True)
class PagedRoute:
    """q, k, v, kv_cache, page_table, kv_lens, q_starts, out: the call's 8 arguments in order."""

    shapes: tuple[tuple[Dim, ...], ...]
    scale: float
    window: int
    layer: int
    codec: int = 0  # a quantized cache's index in runtime/engine/kv_codec.CODEC_IDS; 0: float

    @property
    def label(self) -> str:
        extra = (f", window {self.window}" if self.window else "") + \
            (f", {CODEC_IDS[self.codec]} cache" if self.codec else "")
        return f"paged attention (layer {self.layer}{extra})"

    def to_json(self) -> dict:
        # a float cache keeps the two scalars it always had; a quantized one adds its codec
        scalars = [self.scale, self.window] + ([self.codec] if self.codec else [])
        return {"route": "kv", "func": PAGED_FUNC, "label": self.label, "scalars": scalars,
                "tensors": [{"arg": i, "shape": [to_json(d) for d in s]} for i, s in enumerate(self.shapes)]}


def match_paged(kernel: Kernel) -> PagedRoute | None:
    body = [n for n in kernel.body if n.op is not Op.CONST]
    if len(body) != 1 or body[0].op is not Op.PAGED_ATTENTION or list(kernel.outputs) != body:
        return None
    n = body[0]
    if [p.uid for p in kernel.params] != [i.uid for i in n.inputs]:
        return None
    shapes = tuple(tuple(x.shape) for x in (*n.inputs, n))
    codec = 0 if n.attrs.kv_store is None else CODEC_IDS.index(n.attrs.kv_store.value)
    return PagedRoute(shapes, n.attrs.scale, n.attrs.window, n.attrs.layer, codec)


__all__ = ["match_paged", "PagedRoute", "PAGED_FUNC"]
