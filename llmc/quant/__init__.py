"""Quantization-aware training for torch models (torch only; the compiler and the runtime
never import this package).

    qat = llmc.quant.prepare_qat(model, "int4", group=64)   # nn.Linear -> FakeQuantLinear
    ... fine-tune qat in torch (weights and the per-group scales are both learned) ...
    plain, grid = llmc.quant.convert(qat)                   # weights on their grid + the scales
    cm = llmc.compile(plain, ..., quant=grid)               # the artifact stores exactly those codes

fake_quant.py  FakeQuantLinear: straight-through rounding, learnable per-group scales (LSQ-style)
qat.py         prepare_qat / convert: which linears (the quantize pass's rules), the LearnedGrid
"""
from .fake_quant import FakeQuantLinear
from .qat import convert, prepare_qat, scale_parameters

__all__ = ["prepare_qat", "convert", "scale_parameters", "FakeQuantLinear"]
