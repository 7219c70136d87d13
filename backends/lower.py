"""Kernel -> TVM PrimFunc: compose the TE rules over a kernel body.

Calling convention of the generated function (the runtime relies on it):
    name   = kernel.name (the `global_symbol`)
    args   = one buffer per kernel.params (in order), then one per kernel.outputs (in
             order), then one int64 scalar per name in kernel.symbols (in order).
Buffers are compact row-major, and need only element alignment (see _relax_alignment).
"""
from __future__ import annotations

import json

import tvm
from tvm import te, tirx

from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel
from llmc.errors import LLMCError

from .te_rules import TE_RULES, LowerCtx


class LoweringError(LLMCError):
    pass


_SUPPORTED_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"}


def describe_kernel(kernel: Kernel) -> str:
    """A short label such as 'matmul+add+gelu' (CONST immediates left out)."""
    return "+".join(n.op.name.lower() for n in kernel.body if n.op is not Op.CONST) or kernel.name


def lower_to_te(kernel: Kernel) -> tuple[list, list, list, LowerCtx]:
    """(input placeholders, output tensors, symbol vars, ctx) for a kernel."""
    ctx = LowerCtx(kernel.symbols)
    tensors: dict[int, te.Tensor] = {}
    inputs = []
    for i, p in enumerate(kernel.params):
        if p.dtype.value not in _SUPPORTED_DTYPES:
            raise LoweringError(f"kernel {kernel.name}: input {i} has unsupported dtype {p.dtype.value}")
        t = te.placeholder(ctx.shape(p.shape), p.dtype.value, name=f"in{i}")
        tensors[p.uid] = t
        inputs.append(t)
    for n in kernel.body:
        rule = TE_RULES.get(n.op)
        if rule is None:
            raise LoweringError(f"kernel {kernel.name}: no TE rule for {n.op.name} ({n.where or '?'})")
        if n.dtype.value not in _SUPPORTED_DTYPES:
            raise LoweringError(f"kernel {kernel.name}: {n.op.name} has unsupported dtype {n.dtype.value}")
        try:
            tensors[n.uid] = rule(ctx, n, [tensors[x.uid] for x in n.inputs])
        except KeyError as e:
            raise LoweringError(f"kernel {kernel.name}: {n.op.name} reads a node that is neither a param nor "
                                f"computed earlier in the body") from e
    outputs = []
    for j, o in enumerate(kernel.outputs):
        t = tensors[o.uid]
        if any(t.same_as(u) for u in inputs + outputs):  # an output must be its own stage
            src = t
            t = te.compute(src.shape, lambda *i: src(*i), name=f"out{j}_copy")
        outputs.append(t)
    extra = set(ctx.vars) - set(kernel.symbols)
    if extra:
        raise LoweringError(f"kernel {kernel.name}: shapes use symbols {sorted(extra)} missing from kernel.symbols")
    sym_vars = [ctx.vars[s] for s in kernel.symbols]
    return inputs, outputs, sym_vars, ctx


def _relax_alignment(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Let parameter buffers be only element-aligned.

    create_prim_func declares 64-byte aligned buffers, and with an AVX target LLVM then
    emits aligned vector moves that fault on numpy arrays or arena views at odd offsets.
    No Python API rebuilds a buffer, so edit data_alignment in the serialized function.
    """
    j = json.loads(tvm.ir.save_json(func))
    nodes = j["nodes"]
    root = nodes[j["root_index"]]
    for vi in nodes[root["data"]["params"]]["data"]:
        ty = nodes[nodes[vi]["data"]["ty"]]
        if ty["type"] == "tirx.BufferType":
            dt = nodes[ty["data"]["dtype"]]["data"]["dtype"]
            ty["data"]["data_alignment"] = max(1, tvm.DataType(dt).bits // 8)
    return tvm.ir.load_json(json.dumps(j))


def lower_kernel(kernel: Kernel) -> tirx.PrimFunc:
    """The unscheduled PrimFunc of a kernel, named kernel.name."""
    inputs, outputs, sym_vars, _ = lower_to_te(kernel)
    func = te.create_prim_func([*inputs, *outputs, *sym_vars])
    return _relax_alignment(func).with_attr("global_symbol", kernel.name)
