"""The TVM CPU backend's contract: rule coverage, the exported calling convention
(params, outputs, int64 symbols), export/load round trip, alignment, errors."""
from __future__ import annotations

import numpy as np
import pytest

from llmc.backends.build import build_kernels, default_target
from llmc.backends.lower import LoweringError, describe_kernel, lower_kernel
from llmc.backends.te_rules import TE_RULES
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import node, sym
from llmc.compiler.ops import CastAttrs, ConstAttrs, NormAttrs, Op
from llmc.errors import TargetError

from tvm_cases import Case, inp

b, s = sym("b"), sym("s")


def test_every_op_has_a_te_rule():
    from llmc.passes.partition import RUNTIME_OPS  # runtime library calls on every device (no TVM kernel)

    missing = [op.name for op in Op if op not in (Op.INPUT, Op.WEIGHT, *RUNTIME_OPS) and op not in TE_RULES]
    assert not missing, f"ops without a TE rule: {missing}"


def test_default_target_is_llvm_for_this_host():
    t = default_target()
    assert t["kind"] == "llvm" and t["num-cores"] >= 1


def test_non_llvm_target_is_refused():
    x = inp("x", (4,))
    c = Case("k", [x], [node(Op.RELU, [x])])
    with pytest.raises(TargetError):
        build_kernels({"k": c.kernel}, {"kind": "cuda"})


def test_unsupported_dtype_is_a_lowering_error():
    x = inp("x", (4,), DType.I4X2)
    c = Case("k", [x], [node(Op.CAST, [x], CastAttrs(DType.F32))])
    with pytest.raises(LoweringError):
        lower_kernel(c.kernel)


def test_calling_convention_export_load_and_unaligned_buffers(tmp_path):
    """args = params (kernel order), outputs (kernel order), symbols (int64, kernel order);
    the exported name is kernel.name; buffers need only element alignment."""
    import tvm

    x, w = inp("x", (b, s, 32)), inp("w", (32,))
    h = node(Op.ADD, [x, node(Op.CONST, [], ConstAttrs(1.0, DType.F32))])
    n = node(Op.RMS_NORM, [h, w], NormAttrs(1e-6))
    c = Case("residual_norm", [x, w], [h, n], ({"b": 2, "s": 3},))
    k = c.kernel
    assert [p.attrs.name for p in k.params] == ["x", "w"] and k.symbols == ("b", "s")
    assert describe_kernel(k) == "add+rms_norm"
    ex = build_kernels({k.name: k}, default_target())
    path = str(tmp_path / "kernels.so")
    ex.export_library(path)
    fn = tvm.runtime.load_module(path)[k.name]

    rng = np.random.default_rng(0)
    B, S = 3, 5

    def view(shape, offset):  # a float32 view starting `offset` elements into a fresh buffer
        n = int(np.prod(shape))
        return np.zeros(n + 16, np.float32)[offset:offset + n].reshape(shape)

    for off in (0, 1, 3, 7):
        xs, ws = view((B, S, 32), off), view((32,), off + 2)
        xs[...] = rng.standard_normal(xs.shape)
        ws[...] = rng.standard_normal(ws.shape)
        o1, o2 = view((B, S, 32), off + 1), view((B, S, 32), off + 5)
        fn(xs, ws, o1, o2, B, S)
        ref_h = xs + 1
        ref_n = ref_h / np.sqrt((ref_h.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * ws
        np.testing.assert_allclose(o1, ref_h, rtol=1e-6)
        np.testing.assert_allclose(o2, ref_n, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception):  # a shape that disagrees with the symbols is refused
        fn(xs, ws, o1, o2, B + 1, S)
