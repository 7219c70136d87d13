"""Weight quantization: the scheme, the methods (one module each) and calibration.

scheme.py     QuantScheme: int8 | int4 (w8a8, fp8 named but refused until built), group, symmetric, method
rtn.py        round-to-nearest: per-channel / per-group scales (and zeros), integer codes
gptq.py       GPTQ: column-by-column rounding with error compensation through the inverse Hessian
awq.py        AWQ: per-input-channel scales searched on activation magnitudes, folded into x's producer
learned.py    LearnedGrid: scales learned by QAT (llmc.quant), looked up by weight row content
calibrate.py  run the graph (llmc's reference interpreter) on token windows, collect each target's inputs
The graph rewrite itself is passes/quantize.py.
"""
from .scheme import METHODS, SCHEMES, QuantScheme

__all__ = ["QuantScheme", "SCHEMES", "METHODS"]
