"""The state an ONNX conversion rule works with: values (`Val`) and the node context (`NodeCtx`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ...errors import LLMCError, UnsupportedOpError
from .. import ir
from ..dtypes import DType
from ..ir import Node, TensorType
from ..ops import NoAttrs, Op
from ..symbolic import Dim, SymDim, SymExpr
from . import onnx_known as K

# ONNX TensorProto element types. DOUBLE stays float64 (never narrowed silently).
_DTYPES = {1: DType.F32, 2: DType.U8, 3: DType.I8, 6: DType.I32, 7: DType.I64, 9: DType.BOOL,
           10: DType.F16, 11: DType.F64, 16: DType.BF16, 17: DType.F8E4M3}


def onnx_dtype(code: int, what: str) -> DType:
    try:
        return _DTYPES[code]
    except (KeyError, TypeError):
        import onnx

        name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else code
        raise LLMCError(f"{what}: unsupported ONNX element type {name}") from None


# ---- values -------------------------------------------------------------------------------
class Val:
    """An ONNX tensor during import: an IR node, a known value, or both (node made lazily)."""

    __slots__ = ("dtype", "node", "known", "param", "name")

    def __init__(self, dtype: DType, node: Node | None = None, known: np.ndarray | None = None,
                 param: str | None = None):
        self.dtype, self.node, self.known, self.param = dtype, node, known, param
        self.name: str | None = param  # the ONNX tensor name, once the value is bound to one

    @staticmethod
    def of(n: Node) -> "Val":
        return Val(n.dtype, node=n)

    @staticmethod
    def const(arr, dtype: DType) -> "Val":
        return Val(dtype, known=K.normalize(np.asarray(arr), dtype))

    @property
    def shape(self) -> tuple[Dim, ...]:
        return tuple(self.node.shape) if self.node is not None else tuple(int(d) for d in self.known.shape)

    @property
    def type(self) -> TensorType:
        return TensorType(self.shape, self.dtype)

    @property
    def rank(self) -> int:
        return len(self.shape)


class SeqVal:
    """An ONNX sequence during import: a python list of tensor values. Sequences exist only
    at import time (their length and positions must be known); the IR has no sequence type."""

    __slots__ = ("items", "name")

    def __init__(self, items: Sequence[Val]):
        self.items, self.name = list(items), None


@dataclass
class NodeInfo:
    label: str  # "name (OpType)" for messages
    where: str  # provenance recorded on IR nodes


class NodeCtx:
    """What a conversion rule sees: the node's inputs and attributes, and ways to build outputs."""

    def __init__(self, cv, proto, info: NodeInfo):
        self.cv, self.proto, self.info = cv, proto, info
        self.op_type = proto.op_type
        self.opset = cv.opset
        self.attrs = {}
        for a in proto.attribute:
            if a.ref_attr_name:
                raise LLMCError(f"attribute {a.name!r} refers to a function attribute outside a function")
            self.attrs[a.name] = a

    # -- inputs --
    def has(self, i: int) -> bool:
        return i < len(self.proto.input) and bool(self.proto.input[i])

    @property
    def n_inputs(self) -> int:
        return len(self.proto.input)

    def val(self, i: int) -> Val:
        if not self.has(i):
            raise LLMCError(f"missing input {i}")
        name = self.proto.input[i]
        v = self.cv.values.get(name)
        if v is None:
            raise LLMCError(f"input {i} ({name!r}) is not defined before this node")
        if isinstance(v, SeqVal):
            raise UnsupportedOpError(f"input {i} ({name!r}) is a sequence, where {self.op_type} takes a tensor")
        return v

    def seq(self, i: int) -> SeqVal:
        """Input i as a sequence (an error for a tensor)."""
        name = self.proto.input[i] if self.has(i) else ""
        v = self.cv.values.get(name)
        if not isinstance(v, SeqVal):
            raise LLMCError(f"input {i} ({name!r}) must be a sequence")
        return v

    def vals(self) -> list[Val]:
        return [self.val(i) for i in range(self.n_inputs) if self.has(i)]

    def node(self, i_or_val) -> Node:
        v = self.val(i_or_val) if isinstance(i_or_val, int) else i_or_val
        return self.cv.materialize(v, self.info.where + "/const")

    def known(self, i: int) -> np.ndarray:
        """The compile-time value of input i (ints and SymExprs in an object array if symbolic)."""
        v = self.val(i)
        if v.known is None:
            raise LLMCError(f"input {i} ({self.proto.input[i]!r}) must be computable at import time, "
                            f"but it depends on runtime data")
        return v.known

    def dims(self, i: int) -> list[Dim]:
        """Input i as a list of (possibly symbolic) integers, e.g. a Reshape target."""
        k = self.known(i)
        if k.ndim > 1 or (k.dtype != object and k.dtype.kind not in "iub"):
            raise LLMCError(f"input {i} must be a 1-D integer tensor, got {k.dtype}{list(k.shape)}")
        return [K.as_dim(e) for e in k.reshape(-1)]

    def ints(self, i: int) -> list[int]:
        ds = self.dims(i)
        if not all(isinstance(d, int) for d in ds):
            raise LLMCError(f"input {i} must be static, got {ds}")
        return ds

    def scalar(self, i: int) -> Dim | float:
        k = self.known(i)
        if k.size != 1:
            raise LLMCError(f"input {i} must be a scalar, got shape {list(k.shape)}")
        e = k.reshape(-1)[0]
        if isinstance(e, SymExpr):
            return e
        return float(e) if k.dtype.kind == "f" else int(e)

    def int_scalar(self, i: int) -> int:
        s = self.scalar(i)
        if not isinstance(s, int):
            raise LLMCError(f"input {i} must be a static integer, got {s}")
        return s

    # -- attributes (typed: a wrong attribute type is an error, not a crash) --
    def _attr(self, name: str, kind: str):
        a = self.attrs.get(name)
        if a is None:
            return None
        from onnx import AttributeProto

        if a.type != getattr(AttributeProto, kind):
            raise LLMCError(f"attribute {name!r} should be {kind}, got {AttributeProto.AttributeType.Name(a.type) if a.type in AttributeProto.AttributeType.values() else a.type}")
        return a

    def attr_int(self, name: str, default: int | None = None) -> int | None:
        a = self._attr(name, "INT")
        return default if a is None else int(a.i)

    def attr_float(self, name: str, default: float | None = None) -> float | None:
        a = self._attr(name, "FLOAT")
        return default if a is None else float(a.f)

    def attr_str(self, name: str, default: str | None = None) -> str | None:
        a = self._attr(name, "STRING")
        return default if a is None else a.s.decode("utf-8", "replace")

    def attr_ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        a = self._attr(name, "INTS")
        return (None if default is None else list(default)) if a is None else [int(v) for v in a.ints]

    def attr_floats(self, name: str) -> list[float] | None:
        a = self._attr(name, "FLOATS")
        return None if a is None else [float(v) for v in a.floats]

    def attr_tensor(self, name: str) -> tuple[np.ndarray, DType] | None:
        a = self._attr(name, "TENSOR")
        return None if a is None else tensor_value(a.t, f"attribute {name!r}")

    # -- building outputs --
    def apply(self, op: Op, vals: Sequence[Val], attrs=None) -> Val:
        """`op` on the inputs: folded when all are known, else an IR node."""
        attrs = NoAttrs() if attrs is None else attrs
        if vals and all(v.known is not None for v in vals):
            out = _infer(op, attrs, vals, self.info.where)
            try:
                return Val(out.dtype, known=K.fold(op, attrs, [v.known for v in vals], out, self.cv.symbols))
            except K.Unfoldable:
                pass
        return Val.of(ir.node(op, [self.node(v) for v in vals], attrs, where=self.info.where))

    def source(self, op: Op, attrs) -> Val:
        return Val.of(ir.node(op, (), attrs, where=self.info.where))

    def const(self, value, dtype: DType) -> Val:
        return Val.const(np.asarray(value), dtype)

    def symbols(self) -> Mapping[str, SymDim]:
        return self.cv.symbols


def _infer(op: Op, attrs, vals: Sequence[Val], where: str) -> TensorType:
    from ..infer import infer_type

    try:
        return infer_type(op, attrs, [v.type for v in vals])
    except LLMCError:
        raise
    except Exception as e:
        raise LLMCError(f"cannot type {op.name} at {where}: {e}") from e


def tensor_value(t, what: str) -> tuple[np.ndarray, DType]:
    """A TensorProto's data as numpy, in the IR dtype it maps to."""
    from onnx import numpy_helper

    dtype = onnx_dtype(t.data_type, what)
    if t.data_location == 1 and not t.raw_data:  # EXTERNAL, not loaded
        raise LLMCError(f"{what}: external tensor data was not loaded")
    try:
        arr = np.asarray(numpy_helper.to_array(t))
    except Exception as e:
        raise LLMCError(f"{what}: unreadable tensor data ({e})") from e
    return arr.astype(dtype.numpy, copy=False), dtype


def py_scalar(x) -> float | int | bool:
    """A one-element array as the python scalar IR attrs hold."""
    x = np.asarray(x)
    if x.dtype.kind == "b":
        return bool(x)
    if x.dtype.kind in "iu":
        return int(x)
    return float(x)
