"""Converts a torch.export `ExportedProgram` to an llmc `Graph`, FX node by FX node.

`Converter` walks the graph from the user outputs back (so asserts and dead code are never
converted), binds placeholders to graph inputs / weights / baked-in constants, converts
sympy sizes to `SymExpr` polynomials over the named input dims, and is the `cx` through
which the per-op rules of `aten_rules` build nodes. After each rule it checks the result
against torch's fake-tensor type for the node (casting the dtype, rejecting a shape
mismatch), so a wrong rule fails at the node that is wrong.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any

import numpy as np
import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree
from torch.utils._sympy.functions import Max as _TorchMax
from torch.utils._sympy.functions import Min as _TorchMin

from ...errors import LLMCError, UnsupportedOpError
from ..dtypes import DType
from ..ir import Graph, Node, TensorType, input_node, node, weight_node
from ..ops import ArangeAttrs, CastAttrs, ConstAttrs, Op, ShapeAttrs
from ..symbolic import Dim as IRDim
from ..symbolic import SymDim, SymExpr
from .aten_rules import RULES, TORCH_DTYPES

_VIEW_OPS = frozenset({  # ops whose result shares its input's storage
    torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims, torch.ops.aten.squeeze.default,
    torch.ops.aten.t.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
    torch.ops.aten.narrow.default, torch.ops.aten.flatten.using_ints, torch.ops.aten.unflatten.int,
    torch.ops.aten.split.Tensor, torch.ops.aten.chunk.default, torch.ops.aten.unbind.int, operator.getitem,
    torch.ops.aten.as_strided.default, torch.ops.aten.diagonal.default, torch.ops.aten.movedim.int,
    torch.ops.aten.view_as.default, torch.ops.aten.reshape_as.default,
})
_UNBOUNDED_HI = 4096  # upper bound used when torch leaves a dim unbounded


class ConversionError(LLMCError):
    """A supported op failed to convert (bad arguments, or disagreement with torch's types)."""


def _to_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype not in TORCH_DTYPES:
        raise UnsupportedOpError(f"weight {name!r} has dtype {t.dtype}, which llmc does not support")
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(DType.BF16.numpy)
    return t.numpy().copy()


def _module_of(n: torch.fx.Node) -> tuple[str, str]:
    stack = n.meta.get("nn_module_stack") or {}
    for path, ty in reversed(list(stack.values())):
        if not path.startswith("_empty"):
            return path, getattr(ty, "__name__", str(ty)).split(".")[-1] if not isinstance(ty, str) else ty
    return "", ""


def _op_name(target) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None)
    mod = getattr(target, "__module__", "")
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return f"{mod}.{name}" if mod and name else str(target)


def _output_names(spec, n: int) -> tuple[str, ...]:
    """Dotted names of the output pytree's leaves (`logits`; `output_0`, ... for tuples)."""
    names: list[str] = []

    def walk(s, prefix: str):
        if s.is_leaf():
            names.append(prefix or "output")
            return
        kids = list(s.children())
        ctx = s.context
        if isinstance(ctx, (list, tuple)) and len(ctx) == len(kids) and all(isinstance(k, (str, int)) for k in ctx):
            keys = [str(k) for k in ctx]
            for k, c in zip(keys, kids):
                walk(c, f"{prefix}.{k}" if prefix else k)
        elif isinstance(ctx, type) and hasattr(ctx, "_fields"):  # namedtuple
            for k, c in zip(ctx._fields, kids):
                walk(c, f"{prefix}.{k}" if prefix else k)
        else:
            for i, c in enumerate(kids):
                walk(c, f"{prefix}_{i}" if prefix else f"output_{i}")

    try:
        walk(spec, "")
    except Exception:  # an exotic container: fall back to positions
        names = []
    if len(names) != n or len(set(names)) != n or not all(names):
        return tuple(f"output_{i}" for i in range(n))
    return tuple(names)


class Converter:
    """Walks the exported FX graph; also the `cx` the ATen rules build nodes through."""

    def __init__(self, ep: ExportedProgram, user_leaves: list, dim_specs: dict[int, dict[int, Any]]):
        self.ep = ep
        self.user_leaves = user_leaves
        self.dim_specs = dim_specs
        self.env: dict[torch.fx.Node, Any] = {}
        self.sym_names: dict[sympy.Symbol, str] = {}
        self.symbols: dict[str, SymDim] = {}
        self.params: dict[str, np.ndarray] = {}
        self.fx: torch.fx.Node | None = None  # the node being converted
        self.where_stack: list[str] = [""]

    # ---- the interface the rules use -----------------------------------------------------
    @property
    def target(self):
        return self.fx.target

    @property
    def val(self):
        return self.fx.meta.get("val")

    @property
    def where(self) -> str:
        return self.where_stack[-1]

    def out_shape(self, i: int | None = None) -> tuple[IRDim, ...]:
        v = self.val if i is None else self.val[i]
        return self.shape_of(v)

    def out_dtype(self, i: int | None = None) -> DType:
        v = self.val if i is None else self.val[i]
        return self.dtype_of(v.dtype)

    def node(self, op: Op, inputs=(), attrs=None) -> Node:
        return node(op, inputs, attrs, where=self.where)

    def cast(self, x: Node, dtype: DType) -> Node:
        return x if x.dtype is dtype else self.node(Op.CAST, (x,), CastAttrs(dtype))

    def reshape(self, x: Node, shape) -> Node:
        shape = tuple(shape)
        return x if tuple(x.shape) == shape else self.node(Op.RESHAPE, (x,), ShapeAttrs(shape))

    def scalar(self, v, dtype: DType) -> Node:
        """A 0-d node holding a python number or a symbolic size."""
        if isinstance(v, Node):
            return self.cast(v, dtype)
        if isinstance(v, SymExpr):  # the value of a symbolic size, as arange(v, v + 1)
            r = self.node(Op.ARANGE, (), ArangeAttrs(v, v + 1, 1, DType.I64))
            return self.cast(self.reshape(r, ()), dtype)
        if dtype is DType.BOOL:
            value = bool(v)
        elif dtype.is_float:
            value = float(v)
        else:
            if isinstance(v, float) and not v.is_integer():
                raise self.unsupported(f"fractional scalar {v} as {dtype.value}")
            value = int(v)
        return self.node(Op.CONST, (), ConstAttrs(value, dtype))

    def rebind(self, mutated: torch.fx.Node, value: Node) -> None:
        """After an in-place op on `mutated`, later readers of it see `value`.

        torch.export already points later readers of `mutated` itself at the op's result;
        readers of other views of the same storage would see the write too, which is not
        modelled, so that is refused when any of them is read after this node."""
        if not isinstance(mutated, torch.fx.Node):
            raise self.unsupported("in-place op on a non-tensor")
        order = {n: i for i, n in enumerate(self.fx.graph.nodes)}
        here = order.get(self.fx, -1)
        for a in _aliases(mutated) - {mutated}:
            if any(order.get(u, -1) > here for u in a.users if u is not self.fx):
                raise self.unsupported(f"in-place write to a tensor whose storage is also read through "
                                       f"'{a.name}' later (aliasing is not modelled)")
        self.env[mutated] = value

    def unsupported(self, reason: str = "") -> UnsupportedOpError:
        msg = f"unsupported op {self.describe(self.fx)}"
        return UnsupportedOpError(f"{msg}: {reason}" if reason else msg)

    def inline(self, gm: torch.fx.GraphModule, args) -> Any:
        """Convert a higher-order op's submodule in place, its placeholders bound to `args`."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(args):
            raise self.unsupported(f"submodule takes {len(placeholders)} args, given {len(args)}")
        self.env.update(zip(placeholders, args))
        out = gm.graph.output_node()
        return self.run(gm, [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, torch.fx.Node)], out.args[0])

    # ---- symbolic dims ------------------------------------------------------------------------
    def dtype_of(self, dt: torch.dtype) -> DType:
        if dt not in TORCH_DTYPES:
            raise self.unsupported(f"dtype {dt} has no llmc equivalent")
        return TORCH_DTYPES[dt]

    def dim(self, d) -> IRDim:
        if isinstance(d, bool):
            raise self.unsupported(f"boolean {d} used as a size")
        if isinstance(d, int):
            return d
        expr = d.node.expr if isinstance(d, torch.SymInt) else d
        return self._poly(sympy.sympify(expr))

    def _poly(self, e) -> IRDim:
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            if e not in self.sym_names:
                raise self.unsupported(f"size {e} is not derived from an input dim (data-dependent shape?)")
            return SymExpr.var(self.sym_names[e])
        if e.is_Add or e.is_Mul:
            parts = [self._poly(a) for a in e.args]
            acc = parts[0]
            for p in parts[1:]:
                acc = acc + p if e.is_Add else acc * p
            return acc
        if e.is_Pow and e.exp.is_Integer and int(e.exp) > 0:
            base, acc = self._poly(e.base), 1
            for _ in range(int(e.exp)):
                acc = base * acc
            return acc
        is_max, is_min = isinstance(e, (sympy.Max, _TorchMax)), isinstance(e, (sympy.Min, _TorchMin))
        if is_max or is_min:  # max(0, n - q), say: fine when one side always wins
            for a in e.args:
                others = [b for b in e.args if b is not a]
                if all(self._always_ge(a, b) if is_max else self._always_ge(b, a) for b in others):
                    return self._poly(a)
        raise self.unsupported(f"symbolic size {e} is not a polynomial in the input dims")

    def _always_ge(self, a, b) -> bool:
        """a >= b over the whole box of the input dims' bounds (checked exactly for linear a - b)."""
        d = sympy.expand(a - b)
        syms = sorted(d.free_symbols, key=str)
        if not syms:
            return bool(d >= 0)
        if any(s not in self.sym_names for s in syms) or sympy.Poly(d, *syms).total_degree() > 1:
            return False
        ranges = [(self.symbols[self.sym_names[s]].lo, self.symbols[self.sym_names[s]].hi) for s in syms]
        return all(bool(d.subs(dict(zip(syms, corner))) >= 0) for corner in itertools.product(*ranges))

    def shape_of(self, v) -> tuple[IRDim, ...]:
        return tuple(self.dim(d) for d in v.shape)

    def _name_symbols(self, placeholder: torch.fx.Node, leaf) -> None:
        specs = self.dim_specs.get(id(leaf), {})
        for axis, d in enumerate(placeholder.meta["val"].shape):
            if not isinstance(d, torch.SymInt):
                continue
            expr = sympy.sympify(d.node.expr)
            spec = specs.get(axis)
            free = sorted(expr.free_symbols, key=str)
            if expr.is_Symbol:
                name = getattr(spec, "__name__", None)
            elif len(free) == 1 and spec is not None and hasattr(spec, "root"):  # derived dim, e.g. 2 * seq
                name = getattr(spec.root, "__name__", None)
            else:
                name = None
            for s in free:
                if s in self.sym_names:
                    continue
                nm = name if (name and s == free[0] and name.isidentifier() and name not in self.symbols) else str(s)
                vr = self.ep.range_constraints.get(s)
                lo = _int_or(vr.lower, 0) if vr is not None else 0
                hi = _int_or(vr.upper, _UNBOUNDED_HI) if vr is not None else _UNBOUNDED_HI
                self.sym_names[s] = nm
                self.symbols[nm] = SymDim(nm, max(lo, 0), max(hi, lo, 0))

    # ---- driving ------------------------------------------------------------------------------
    def convert(self) -> Graph:
        ep, sig = self.ep, self.ep.graph_signature
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        inputs: list[Node] = []
        user_index = 0
        for spec in sig.input_specs:
            n = placeholders[spec.arg.name]
            self.fx = n
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                t = ep.state_dict.get(spec.target) if spec.kind is not InputKind.CONSTANT_TENSOR else None
                if t is None:
                    t = ep.constants.get(spec.target)
                if not isinstance(t, torch.Tensor):
                    raise self.unsupported(f"{spec.kind.name.lower()} {spec.target!r} is not a tensor")
                arr = _to_numpy(t, spec.target)
                self.params[spec.target] = arr
                self.env[n] = weight_node(spec.target, TensorType(tuple(arr.shape), TORCH_DTYPES[t.dtype]))
            elif spec.kind is InputKind.USER_INPUT:
                leaf = self.user_leaves[user_index] if user_index < len(self.user_leaves) else None
                user_index += 1
                if isinstance(spec.arg, TensorArgument):
                    self._name_symbols(n, leaf)
                    val = n.meta["val"]
                    x = input_node(spec.arg.name, TensorType(self.shape_of(val), self.dtype_of(val.dtype)))
                    inputs.append(x)
                    self.env[n] = x
                elif isinstance(spec.arg, ConstantArgument):
                    self.env[n] = spec.arg.value
                else:
                    raise self.unsupported(f"input {spec.arg.name!r} of kind {type(spec.arg).__name__} "
                                           "(only tensors and constants are supported)")
            else:
                raise self.unsupported(f"program input of kind {spec.kind.name}")
        out_node = ep.graph.output_node()
        user_outs = [a for a, s in zip(out_node.args[0], sig.output_specs) if s.kind is OutputKind.USER_OUTPUT]
        outputs = self.run(ep.graph_module, [a for a in user_outs if isinstance(a, torch.fx.Node)], user_outs)
        for i, o in enumerate(outputs):
            if not isinstance(o, Node):
                raise UnsupportedOpError(f"output {i} of the model is {type(o).__name__}, not a tensor")
        names = _output_names(ep.call_spec.out_spec, len(outputs))
        g = Graph(tuple(inputs), tuple(outputs), {}, dict(self.symbols), names)
        used = {n.attrs.name for n in g.nodes() if n.op is Op.WEIGHT}
        return Graph(g.inputs, g.outputs, {k: v for k, v in self.params.items() if k in used}, g.symbols, names)

    def run(self, gm: torch.fx.GraphModule, roots: list[torch.fx.Node], result):
        """Convert the nodes of gm's graph that `roots` depend on; return `result` mapped."""
        needed: set[torch.fx.Node] = set()
        stack = list(roots)
        mutations = [n for n in gm.graph.nodes if _mutates(n)]
        while stack:
            while stack:
                n = stack.pop()
                if n not in needed and n not in self.env:
                    needed.add(n)
                    stack.extend(n.all_input_nodes)
            # an in-place op on (a view of) a needed tensor is needed too, though no output
            # depends on its result node: the write is visible through the other views
            stack = [m for m in mutations if m not in needed and _aliases(m.args[0]) & needed]
        for n in gm.graph.nodes:
            if n not in needed:
                continue
            if n.op == "get_attr":
                self.env[n] = self._get_attr(gm, n)
            elif n.op == "call_function":
                self.env[n] = self._call(n)
            else:
                self.fx = n
                raise self.unsupported(f"FX node kind {n.op!r}")
        return torch.fx.node.map_arg(result, lambda a: self.env[a])

    def _get_attr(self, gm, n):
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            arr = _to_numpy(obj, n.target)
            self.params[n.target] = arr
            return weight_node(n.target, TensorType(tuple(arr.shape), TORCH_DTYPES[obj.dtype]))
        return obj

    def _call(self, n: torch.fx.Node):
        prev = self.fx
        self.fx = n
        path, _ = _module_of(n)
        self.where_stack.append(path or self.where)
        try:
            val = n.meta.get("val")
            if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
                return self.dim(val)  # sym_size, and python arithmetic on sizes
            fn = RULES.get(n.target)
            if fn is None:
                raise self.unsupported()
            args = torch.fx.node.map_arg(n.args, lambda a: self.env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: self.env[a])
            try:
                out = fn(self, *args, **kwargs)
            except LLMCError as e:
                if isinstance(e, (UnsupportedOpError, ConversionError)):
                    raise
                raise ConversionError(f"cannot convert {self.describe(n)}: {e}") from e
            except (TypeError, ValueError, IndexError, KeyError, AttributeError, NotImplementedError) as e:
                raise ConversionError(f"cannot convert {self.describe(n)}: {type(e).__name__}: {e}") from e
            return self._settle(out, val)
        finally:
            self.fx = prev
            self.where_stack.pop()

    def _settle(self, out, val):
        """Match a rule's result to torch's type for the node: cast the dtype, check the shape."""
        if isinstance(out, Node) and isinstance(val, torch.Tensor):
            out = self.cast(out, self.dtype_of(val.dtype))
            shape = self.shape_of(val)
            if tuple(out.shape) != shape:
                raise ConversionError(f"converting {self.describe(self.fx)} gave {out.type}, but torch's shape is "
                                      f"[{', '.join(map(str, shape))}]")
            return out
        if isinstance(out, (list, tuple)) and isinstance(val, (list, tuple)) and len(out) == len(val):
            return [self._settle(o, v) for o, v in zip(out, val)]
        return out

    def describe(self, n: torch.fx.Node | None) -> str:
        if n is None:
            return "<program>"
        path, ty = _module_of(n)
        where = f"module '{path}'" + (f" ({ty})" if ty else "") if path else "the top-level module"
        text = f"{_op_name(n.target)} (FX node '{n.name}') in {where}"
        trace = (n.meta.get("stack_trace") or "").strip().splitlines()
        if len(trace) >= 2:
            text += f"; at {trace[-2].strip()}: {trace[-1].strip()}"
        return text


def _mutates(n: torch.fx.Node) -> bool:
    """An in-place ATen op (add_, copy_, ...) whose first argument is the mutated tensor."""
    t = n.target
    return (n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable
            and bool(n.args) and isinstance(n.args[0], torch.fx.Node))


def _aliases(n) -> set:
    """The FX nodes sharing n's storage: its base (through view ops) and all views of that."""
    if not isinstance(n, torch.fx.Node):
        return set()
    base = n
    while _is_view(base):
        base = base.args[0]
    out, stack = set(), [base]
    while stack:
        a = stack.pop()
        if a not in out:
            out.add(a)
            stack.extend(u for u in a.users if _is_view(u))
    return out


def _is_view(n) -> bool:
    """n's result shares its first argument's storage. A getitem is a view only of a view
    op's results (split, chunk, unbind): the outputs of topk, sort or max.dim are separate
    tensors."""
    if not (n.op == "call_function" and n.target in _VIEW_OPS and n.args and isinstance(n.args[0], torch.fx.Node)):
        return False
    return n.target is not operator.getitem or n.args[0].target in _VIEW_OPS


def _int_or(v, default: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return default
    return int(f) if abs(f) < 2 ** 62 else default
