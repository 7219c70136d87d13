"""QuantScheme: what `--quant/--group/--method/--sym` ask for, checked before any work."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import LLMCError

SCHEMES = ("int8", "int4", "w8a8", "fp8")
BUILT = ("int8", "int4", "w8a8", "fp8")  # the schemes the quantize pass and the CPU kernels implement today
METHODS = ("rtn", "gptq", "awq", "qat", "smoothquant")  # qat: scales learned in torch (passes/quant/learned.py)
GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    """Quantization of the matmuls whose right operand is a weight.

    int8: weight-only, symmetric, one scale per output channel (group = K); `group` is ignored.
    w8a8: int8 weights as int8, and the activations int8 too, per token at run time (rtn or
    smoothquant, which needs calibration).
    fp8: weights float8 e4m3 with one scale per output channel, activations e4m3 per token at
    run time (rtn).
    int4: groups of `group` consecutive input channels share a scale (and a zero point
    unless `symmetric`). A group that does not divide a matmul's K is an error naming it.
    Embeddings and the LM head stay unquantized unless `quantize_lm_head`."""

    kind: str = "int8"
    group: int = 128
    symmetric: bool = False  # int4 only (int8 is always symmetric)
    method: str = "rtn"
    calib_samples: int = 32  # token windows read from the calibration text (gptq, awq)
    calib_window: int = 128  # tokens per window (capped by the model's seq bound)
    quantize_lm_head: bool = False
    act_order: bool = False  # gptq: columns in decreasing Hessian-diagonal order (static groups)
    damp: float = 0.01  # gptq: dampening, a fraction of the mean Hessian diagonal

    def __post_init__(self) -> None:
        if self.kind not in SCHEMES:
            raise LLMCError(f"unknown quantization scheme {self.kind!r}; choose one of {', '.join(SCHEMES)}")
        if self.kind not in BUILT:
            raise LLMCError(f"quantization scheme {self.kind!r} is not built yet (weight-only {' and '.join(BUILT)} "
                            f"are); see docs/quantization.md")
        if self.method not in METHODS:
            raise LLMCError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.method == "smoothquant" and self.kind != "w8a8") or \
                (self.kind == "w8a8" and self.method not in ("rtn", "smoothquant")) or \
                (self.kind == "fp8" and self.method != "rtn"):
            raise LLMCError(f"--method {self.method} does not go with --quant {self.kind} (w8a8 takes rtn or "
                            f"smoothquant, fp8 rtn; smoothquant is for w8a8 only)")
        if self.kind == "int4" and self.group not in GROUPS:
            raise LLMCError(f"int4 group size must be one of {GROUPS}, got {self.group!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise LLMCError(f"--calib-samples must be a positive integer, got {self.calib_samples!r}")
        if not 0 < self.damp < 1:
            raise LLMCError(f"gptq dampening must be in (0, 1), got {self.damp}")

    @property
    def bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    @property
    def act_bits(self) -> int:
        return 8 if self.kind in ("w8a8", "fp8") else 0

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant")

    def group_for(self, k: int) -> int:
        return self.group if self.kind == "int4" else k

    @property
    def is_symmetric(self) -> bool:
        return self.kind != "int4" or self.symmetric

    def describe(self) -> str:
        if self.kind == "w8a8":
            return f"w8a8: int8 weights per output channel, int8 activations per token, {self.method}"
        if self.kind == "fp8":
            return "fp8: e4m3 weights per output channel, e4m3 activations per token"
        if self.kind == "int8":
            return f"int8 weight-only, per output channel, symmetric, {self.method}"
        return f"int4 weight-only, group {self.group}, {'symmetric' if self.symmetric else 'asymmetric'}, {self.method}"


__all__ = ["QuantScheme", "SCHEMES", "METHODS", "BUILT", "GROUPS"]
