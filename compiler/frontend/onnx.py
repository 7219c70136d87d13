"""ONNX frontend: an ONNX model (opset >= 13) to an llmc Graph.

    graph = from_onnx("model.onnx", dim_bounds={"batch": (1, 8), "seq": (1, 512)})

Graph inputs keep their `dim_param` names as symbolic dims (sanitised to identifiers);
initializers become named weights. Files older than opset 13 are upgraded on import with
`onnx.version_converter`; float64 tensors stay float64.

Bounds of the symbolic dims (`dim_bounds`, inclusive (lo, hi) per name):
- a name the file uses (its `dim_param`, as written or sanitised) gives that dim's bounds;
- a file dim of another name, or with neither `dim_value` nor `dim_param`, takes the
  bounds of `batch` when it is axis 0 of a graph input and of `seq` when it is axis 1
  (by position, so `--batch`/`--seq-len` cover files whose dims are named `b`/`s`);
- any other such dim is an error naming it (pass its bounds explicitly, `--dim NAME=LO:HI`
  on the command line), unless `from_onnx(..., default_bound=(lo, hi))` is given;
- a name in `dim_bounds` that the file does not use is an error, except `batch`/`seq`;
- with no `dim_bounds` at all, every symbolic dim gets `default_bound` ((1, 2048) unless given).

Shape arithmetic is folded while importing: every
tensor the importer can compute (constants, `Shape` of a tensor with symbolic dims, and
anything derived from those) is kept as a known value (see `onnx_known`), so the IR
holds only the computation on real data, with Reshape/Expand/Slice targets as static or
symbolic dims. The per-op conversion rules live in `onnx_rules`.

Every failure is an `LLMCError` naming the ONNX node (name and op type) it came from.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from ...errors import LLMCError, UnsupportedOpError
from .. import ir
from ..dtypes import DType
from ..ir import Graph, Node, TensorType
from ..ops import ArangeAttrs, AxisAttrs, ConstAttrs, FullAttrs, Op, ShapeAttrs
from ..symbolic import Dim, SymDim, SymExpr
from . import onnx_known as K
from .onnx_context import NodeCtx, NodeInfo, SeqVal, Val, onnx_dtype, py_scalar, tensor_value

MIN_OPSET, MAX_OPSET = 13, 25
DEFAULT_DOMAINS = ("", "ai.onnx")
POSITIONAL = ("batch", "seq")  # dim_bounds names that also bound axis 0 / axis 1 of any input

__all__ = ["from_onnx", "load_model"]


def from_onnx(path_or_model, *, dim_bounds: Mapping[str, tuple[int, int]] | None = None,
              default_bound: tuple[int, int] | None = None, base_dir: str | None = None) -> Graph:
    """Import an ONNX model (a path, serialized bytes or an `onnx.ModelProto`) as a Graph.

    `dim_bounds` maps a dim_param name (as written in the model, or sanitised) to its
    inclusive bounds, with `batch`/`seq` also bounding axis 0/1 of inputs by position (see
    the module docstring). Symbolic dims these leave unbounded get `default_bound` when it
    is given (or when `dim_bounds` is empty: (1, 2048)), else they are an error. `base_dir`
    locates external weight files of a ModelProto or bytes (a path uses its own directory).
    """
    model = load_model(path_or_model, base_dir)
    return _Converter(model, dict(dim_bounds or {}), default_bound).run()


DEFAULT_BOUND = (1, 2048)  # symbolic dims of a file imported with no dim_bounds at all


def load_model(src, base_dir: str | None = None):
    """Parse and sanity-check an ONNX model; external data is loaded, local functions inlined."""
    import onnx
    from onnx import external_data_helper

    where = "<model>"
    try:
        if isinstance(src, onnx.ModelProto):
            model = src
        elif isinstance(src, (bytes, bytearray)):
            model = onnx.load_model_from_string(bytes(src))
        elif isinstance(src, (str, os.PathLike)):
            where = os.fspath(src)
            if not os.path.isfile(where):
                raise LLMCError(f"ONNX model file {where!r} does not exist")
            model = onnx.load(where, load_external_data=False)
            base_dir = base_dir or os.path.dirname(os.path.abspath(where))
        else:
            raise LLMCError(f"from_onnx expects a path, bytes or onnx.ModelProto, got {type(src).__name__}")
        if _uses_external_data(model):
            external_data_helper.load_external_data_for_model(model, base_dir or os.getcwd())
    except LLMCError:
        raise
    except Exception as e:  # protobuf DecodeError, missing/out-of-tree external files, ...
        raise LLMCError(f"cannot read ONNX model {where}: {type(e).__name__}: {e}") from e
    _check_model(model, where)
    model = _upgrade_opset(model, where)
    if len(model.functions):
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:
            raise LLMCError(f"{where}: cannot inline the model's local functions: {e}") from e
    return model


def _check_strings(model, where: str) -> None:
    """Names must be text: protobuf hands back bytes for a string field that is not UTF-8."""
    g = model.graph

    def strings():
        yield from (o.domain for o in model.opset_import)
        for n in g.node:
            yield from (n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute))
        yield from (t.name for t in g.initializer)
        for vi in (*g.input, *g.output):
            yield vi.name
            yield from (d.dim_param for d in vi.type.tensor_type.shape.dim)

    for s in strings():
        if not isinstance(s, str):
            raise LLMCError(f"{where}: malformed model, the name {s!r} is not UTF-8 text")


def _uses_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def _check_model(model, where: str) -> None:
    if not model.HasField("graph") or not len(model.graph.output):
        raise LLMCError(f"{where} is not an ONNX model (no graph with outputs)")
    _check_strings(model, where)
    versions = {o.domain: o.version for o in model.opset_import}
    v = versions.get("", versions.get("ai.onnx"))
    if v is None:
        raise LLMCError(f"{where}: the model imports no default-domain (ai.onnx) opset")
    if v > MAX_OPSET:
        raise LLMCError(f"{where}: ONNX opset {v} is not supported (llmc reads opsets up to {MAX_OPSET}; "
                        f"re-export with an older opset_version)")


def _opset(model) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    return versions.get("", versions.get("ai.onnx"))


def _upgrade_opset(model, where: str):
    """Models older than MIN_OPSET are upgraded to it with onnx's version converter, so the
    rules only know opsets >= 13 (the backend test models in the onnx wheel are opset 6-12)."""
    v = _opset(model)
    if v >= MIN_OPSET:
        return model
    from onnx import defs, version_converter

    unknown = sorted({n.op_type for n in model.graph.node
                      if n.domain in DEFAULT_DOMAINS and not defs.has(n.op_type)})
    if unknown:
        raise UnsupportedOpError(f"{where}: unknown ONNX operator(s) {', '.join(unknown)} (no schema in the "
                                 f"default domain), cannot upgrade opset {v}")
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the C++ converter raises RuntimeError/ValueError/ConvertError naming the op
        ops = sorted({n.op_type for n in model.graph.node})
        raise LLMCError(f"{where}: cannot upgrade ONNX opset {v} to {MIN_OPSET} with onnx.version_converter "
                        f"({type(e).__name__}: {str(e).strip()[:300]}); the model's ops: {', '.join(ops)}. "
                        f"Re-export with opset_version >= {MIN_OPSET}") from e


def _sanitize(name: str) -> str:
    s = re.sub(r"\W", "_", name.strip()) or "dim"
    return s if s.isidentifier() else "d_" + s


class _Converter:
    def __init__(self, model, dim_bounds: dict[str, tuple[int, int]], default_bound: tuple[int, int] | None):
        self.model, self.graph = model, model.graph
        versions = {o.domain: o.version for o in model.opset_import}
        self.opset = versions.get("", versions.get("ai.onnx"))
        self.dim_bounds, self.default_bound = dim_bounds, default_bound
        self.values: dict[str, Val] = {}
        self.symbols: dict[str, SymDim] = {}
        self._sym_names: dict[str, str] = {}  # dim_param -> symbol
        self._unbounded: dict[str, tuple[str, int]] = {}  # dim_param -> (input, axis) with no bounds
        self.params: dict[str, np.ndarray] = {}
        self.inputs: list[Node] = []

    # -- graph boundary --
    def run(self) -> Graph:
        self._read_initializers()
        self._read_inputs()
        unknown = set(self.dim_bounds) - set(self._sym_names) - set(self.symbols) - set(POSITIONAL)
        if unknown:
            raise LLMCError(f"dim_bounds: unknown dims {sorted(unknown)} (the model's are {sorted(self._sym_names)})")
        if self._unbounded:
            dims = ", ".join(f"{p!r} (input {i!r} axis {a})" for p, (i, a) in self._unbounded.items())
            hint = " ".join(f"--dim {self._sym_names[p]}=LO:HI" for p in self._unbounded)
            raise LLMCError(f"no bounds for the symbolic dims {dims}: only axis 0 (batch) and axis 1 (seq) of an "
                            f"input take the batch/seq bounds by position; give the others explicitly, e.g. "
                            f"dim_bounds={{'NAME': (lo, hi)}} or `{hint}` on the command line")
        for proto in self._needed_nodes():
            self._convert(proto)
        outputs, names = [], []
        for o in self.graph.output:
            v = self.values.get(o.name)
            if v is None:
                raise LLMCError(f"graph output {o.name!r} is not produced by any node")
            if isinstance(v, Val) and v.node is None and v.known is not None and v.known.ndim == 0 \
                    and not K.has_symbols(v.known):  # a scalar CONST is an immediate, not a buffer: FULL is computed
                v.node = ir.node(Op.FULL, (), FullAttrs((), py_scalar(v.known), v.dtype), where=o.name)
            outputs.append(self.materialize(v, o.name))
            names.append(o.name)
        return Graph(tuple(self.inputs), tuple(outputs), dict(self.params), dict(self.symbols), tuple(names))

    def _read_initializers(self) -> None:
        for t in self.graph.initializer:
            if not t.name or t.name in self.values:
                raise LLMCError(f"initializer {t.name!r} is unnamed or duplicated")
            arr, dtype = tensor_value(t, f"initializer {t.name!r}")
            self.values[t.name] = Val(dtype, known=arr, param=t.name)

    def _read_inputs(self) -> None:
        seen = set()
        for vi in self.graph.input:
            if vi.name in self.values and self.values[vi.name].param:
                continue  # an initializer listed as input (IR < 4): a weight with a default
            if not vi.name or vi.name in seen:
                raise LLMCError(f"graph input {vi.name!r} is unnamed or duplicated")
            seen.add(vi.name)
            if vi.type.WhichOneof("value") != "tensor_type":
                raise LLMCError(f"graph input {vi.name!r} is not a tensor")
            tt = vi.type.tensor_type
            dtype = onnx_dtype(tt.elem_type, f"graph input {vi.name!r}")
            if not tt.HasField("shape"):
                raise LLMCError(f"graph input {vi.name!r} has no shape (its rank must be known)")
            shape = tuple(self._input_dim(vi.name, i, d) for i, d in enumerate(tt.shape.dim))
            n = ir.input_node(vi.name, TensorType(shape, dtype))
            self.inputs.append(n)
            self.values[vi.name] = Val.of(n)

    def _input_dim(self, input_name: str, axis: int, d) -> Dim:
        if d.HasField("dim_value"):
            if d.dim_value < 0:
                raise LLMCError(f"graph input {input_name!r} dim {axis} is negative ({d.dim_value})")
            return int(d.dim_value)
        param = d.dim_param if d.HasField("dim_param") and d.dim_param else f"{input_name}_dim{axis}"
        if param not in self._sym_names:
            name, k = _sanitize(param), 1
            while name in self.symbols:
                name, k = f"{_sanitize(param)}_{k}", k + 1
            bound = self._bound_of(param, name, input_name, axis)
            try:
                lo, hi = bound
                self.symbols[name] = SymDim(name, int(lo), int(hi))
            except (TypeError, ValueError) as e:
                raise LLMCError(f"graph input {input_name!r} dim {axis}: {e}") from e
            self._sym_names[param] = name
        return SymExpr.var(self._sym_names[param])

    def _bound_of(self, param: str, name: str, input_name: str, axis: int):
        """The bounds of a newly seen symbolic dim (the rule is in the module docstring)."""
        if not self.dim_bounds:
            return self.default_bound or DEFAULT_BOUND
        for key in (param, name):
            if key in self.dim_bounds:
                return self.dim_bounds[key]
        positional = POSITIONAL[axis] if axis < len(POSITIONAL) else None
        if positional in self.dim_bounds:
            return self.dim_bounds[positional]
        if self.default_bound is not None:
            return self.default_bound
        self._unbounded[param] = (input_name, axis)
        return DEFAULT_BOUND  # reported with the others once every input is read

    def _needed_nodes(self) -> list:
        """The nodes the graph outputs depend on, in file order (dead nodes are not converted)."""
        producer = {}
        for i, n in enumerate(self.graph.node):
            for o in n.output:
                if o:
                    if o in producer or (o in self.values):
                        raise LLMCError(f"tensor {o!r} is defined twice (node {n.name!r} ({n.op_type}))")
                    producer[o] = i
        need, stack = set(), [o.name for o in self.graph.output]
        while stack:
            name = stack.pop()
            i = producer.get(name)
            if i is None or i in need:
                continue
            need.add(i)
            stack.extend(x for x in self.graph.node[i].input if x)
        return [self.graph.node[i] for i in sorted(need)]

    # -- nodes --
    def _convert(self, proto) -> None:
        from .onnx_rules import RULES

        name = proto.name or (proto.output[0] if len(proto.output) else "")
        info = NodeInfo(f"ONNX node {name!r} ({proto.op_type})", name or proto.op_type)
        domain = "" if proto.domain in DEFAULT_DOMAINS else proto.domain
        fn = RULES.get((domain, proto.op_type))
        if fn is None:
            dom = f" from domain {proto.domain!r}" if domain else ""
            raise UnsupportedOpError(f"{info.label}: unsupported operator {proto.op_type}{dom}")
        ctx = NodeCtx(self, proto, info)
        try:
            outs = fn(ctx)
        except K.Unfoldable as e:
            raise LLMCError(f"{info.label}: {e}") from e
        except LLMCError as e:
            if str(e).startswith(info.label):
                raise
            raise type(e)(f"{info.label}: {e}") from e
        outs = [outs] if isinstance(outs, (Val, SeqVal)) else list(outs)
        for i, oname in enumerate(proto.output):
            if not oname:
                continue
            if i >= len(outs) or outs[i] is None:
                raise UnsupportedOpError(f"{info.label}: output {i} ({oname!r}) is not supported")
            if outs[i].name is None:
                outs[i].name = oname
            self.values[oname] = outs[i]

    # -- known values to IR --
    def materialize(self, v: Val, hint: str) -> Node:
        if isinstance(v, SeqVal):
            raise UnsupportedOpError(f"{hint!r} is a sequence; llmc models take and return tensors only")
        if v.node is None:
            v.node = self._const_node(v, v.name or hint)
        return v.node

    def _const_node(self, v: Val, hint: str) -> Node:
        arr, dtype = v.known, v.dtype
        if K.has_symbols(arr):  # each element a one-element arange: [s] = arange(s, s + 1)
            parts = [ir.node(Op.ARANGE, (), ArangeAttrs(e, e + 1, 1, dtype), where=hint) for e in K.dims_of(arr)]
            flat = parts[0] if len(parts) == 1 else ir.node(Op.CONCAT, parts, AxisAttrs(0), where=hint)
            return flat if arr.shape == (arr.size,) else ir.node(Op.RESHAPE, [flat], ShapeAttrs(tuple(arr.shape)), hint)
        if v.param is not None and arr.size > 1:
            return self.weight(v.param, arr, dtype)
        if arr.ndim == 0:
            return ir.node(Op.CONST, (), ConstAttrs(py_scalar(arr), dtype), where=hint)
        flat = arr.reshape(-1)
        if arr.size == 0 or bool(np.all(flat == flat[0])):
            value = py_scalar(flat[0]) if arr.size else py_scalar(np.zeros((), dtype.numpy))
            return ir.node(Op.FULL, (), FullAttrs(tuple(int(d) for d in arr.shape), value, dtype), where=hint)
        return self.weight(hint, arr, dtype)

    def weight(self, name: str, arr: np.ndarray, dtype: DType) -> Node:
        base, k = name, 1
        while name in self.params and self.params[name] is not arr:
            name, k = f"{base}_{k}", k + 1
        self.params[name] = arr
        return ir.weight_node(name, TensorType(tuple(int(d) for d in arr.shape), dtype))
