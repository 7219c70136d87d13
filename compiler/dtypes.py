"""Element types of llmc tensors.

One enum for the whole toolchain: the IR, the numpy reference, TVM lowering and the
artifact manifest all name dtypes through it, so a new dtype is added in one place.
"""
from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    F32 = "float32"
    F16 = "float16"
    BF16 = "bfloat16"
    I64 = "int64"
    I32 = "int32"
    I8 = "int8"
    U8 = "uint8"
    BOOL = "bool"
    # Room for quantized storage: packed int4 (two per byte) and fp8 (e4m3). They have
    # no numpy arithmetic; passes that introduce them also introduce their dequantize.
    I4X2 = "int4x2"
    F8E4M3 = "float8_e4m3fn"
    # float64: ONNX models (e.g. onnx's own backend test models) compute in it; compiled as
    # is rather than narrowed to float32.
    F64 = "float64"

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16, DType.F8E4M3, DType.F64)

    @property
    def is_int(self) -> bool:
        return self in (DType.I64, DType.I32, DType.I8, DType.U8, DType.I4X2)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype used to hold this type (bf16/fp8 through ml_dtypes)."""
        if self is DType.BF16 or self is DType.F8E4M3:
            import ml_dtypes  # shipped with TVM; only needed for these two

            return np.dtype(getattr(ml_dtypes, "bfloat16" if self is DType.BF16 else "float8_e4m3fn"))
        if self is DType.I4X2:
            return np.dtype(np.uint8)
        return np.dtype(self.value)

    @staticmethod
    def from_numpy(dt) -> "DType":
        name = np.dtype(dt).name
        for d in DType:
            if d.value == name:
                return d
        raise ValueError(f"no llmc dtype for numpy dtype {name!r}")


_ITEMSIZE = {
    DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.I64: 8, DType.I32: 4,
    DType.I8: 1, DType.U8: 1, DType.BOOL: 1, DType.I4X2: 1, DType.F8E4M3: 1, DType.F64: 8,
}


def promote(a: DType, b: DType) -> DType:
    """Result dtype of a binary elementwise op (torch-like: float beats int, wider wins)."""
    if a == b:
        return a
    order = [DType.BOOL, DType.U8, DType.I8, DType.I32, DType.I64, DType.F8E4M3, DType.BF16, DType.F16, DType.F32, DType.F64]
    if {a, b} == {DType.F16, DType.BF16}:
        return DType.F32
    return max(a, b, key=order.index)
