"""collapse_dims: a row-wise kernel lowered on [rows, last] views computes what the original
kernel computes (both built with TVM for the CPU and run on the same fresh random data),
and kernels whose ops or shapes tie them to the full rank are left alone."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from llmc.backends.collapse_dims import collapse_leading_dims
from llmc.backends.lower import lower_kernel
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import input_node, node, sym, TensorType
from llmc.compiler.ops import GeluAttrs, Op, SliceAttrs
from llmc.compiler.program import Kernel

b, s = sym("b"), sym("s")
F32 = DType.F32


def inp(name, shape, dtype=F32):
    return input_node(name, TensorType(tuple(shape), dtype))


def kernel(params, outputs) -> Kernel:
    """params -> outputs, with every node in between as the body (topological)."""
    body, seen = [], {p.uid for p in params}

    def visit(n):
        if n.uid in seen:
            return
        seen.add(n.uid)
        for i in n.inputs:
            visit(i)
        body.append(n)

    for o in outputs:
        visit(o)
    return Kernel("k", tuple(params), tuple(body), tuple(outputs), ("b", "s"))


def bias_gelu():
    x, bias = inp("x", (b, s, 24)), inp("bias", (24,))
    return kernel([x, bias], [node(Op.GELU, [node(Op.ADD, [x, bias])], GeluAttrs(False))])


def swiglu():
    x = inp("x", (b, s, 32))
    gate = node(Op.SLICE, [x], SliceAttrs(2, 0, 16))
    up = node(Op.SLICE, [x], SliceAttrs(2, 16, 32))
    return kernel([x], [node(Op.MUL, [node(Op.SILU, [gate]), up])])


def _run(k: Kernel, arrays, env):
    f = tvm.compile(tvm.IRModule({"k": lower_kernel(k)}), target="llvm")["k"]
    outs = [np.zeros([int(d.evaluate(env)) if not isinstance(d, int) else d for d in o.shape], o.dtype.numpy)
            for o in k.outputs]
    dev = [tvm.runtime.tensor(a) for a in (*arrays, *outs)]
    f(*dev, *[env[x] for x in k.symbols])
    return [t.numpy() for t in dev[len(arrays):]]


@pytest.mark.parametrize("make", [bias_gelu, swiglu])
def test_collapsed_kernel_computes_the_same(make):
    k = make()
    flat = collapse_leading_dims(k)
    assert flat is not None
    rank3 = [len(t.shape) == 3 for t in (*k.params, *k.outputs)]
    assert [v is not None for v in flat.views] == rank3
    assert all(len(v) == 2 and v[0] == b * s for v in flat.views if v is not None)
    rng = np.random.default_rng()
    env = {"b": 3, "s": 5}
    arrays = [rng.standard_normal([d if isinstance(d, int) else d.evaluate(env) for d in p.shape]).astype(np.float32)
              for p in k.params]
    want = _run(k, arrays, env)
    views = [a.reshape(a.shape[0] * a.shape[1], -1) if a.ndim == 3 else a for a in arrays]
    got = _run(flat.kernel, views, env)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=1e-6, atol=1e-6)


def test_kernels_tied_to_the_full_rank_are_left_alone():
    x = inp("x", (b, s, 32))
    assert collapse_leading_dims(kernel([x], [node(Op.SLICE, [x], SliceAttrs(1, 0, 2))])) is None  # not the last axis
    pos = inp("pos", (s, 32))  # broadcasts over batch only: rows of x do not line up with it
    assert collapse_leading_dims(kernel([x, pos], [node(Op.ADD, [x, pos])])) is None
    y = inp("y", (2, 3, 32))  # static leading dims: divisions by constants already
    assert collapse_leading_dims(kernel([y], [node(Op.EXP, [y])])) is None
    w = inp("w", (32, 8))
    assert collapse_leading_dims(kernel([x, w], [node(Op.MATMUL, [x, w])])) is None
