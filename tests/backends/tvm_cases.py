"""Test support for the TVM CPU backend: one-kernel graphs, one build per module, and a
runner that checks a kernel against the numpy reference interpreter at several sizes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ir import Graph, Node, TensorType, input_node
from llmc.compiler.ops import Op
from llmc.compiler.program import Kernel, lower_to_program
from llmc.compiler.symbolic import SymDim, evaluate

Gen = Callable[[np.random.Generator, tuple, DType], np.ndarray]


def inp(name: str, shape: Sequence, dtype: DType = DType.F32) -> Node:
    return input_node(name, TensorType(tuple(shape), dtype))


def default_gen(rng: np.random.Generator, shape: tuple, dtype: DType) -> np.ndarray:
    if dtype is DType.BOOL:
        return rng.random(shape) < 0.5
    if dtype.is_int:
        return rng.integers(-5, 6, size=shape).astype(dtype.numpy)
    return rng.standard_normal(shape).astype(dtype.numpy)


def positive(rng, shape, dtype):
    return (rng.random(shape) * 3 + 0.1).astype(dtype.numpy)


def indices(high: int, low: int = 0) -> Gen:
    return lambda rng, shape, dtype: rng.integers(low, high, size=shape).astype(dtype.numpy)


@dataclass
class Case:
    """A graph whose computing nodes all go into one kernel."""

    name: str
    inputs: Sequence[Node]
    outputs: Sequence[Node]
    sizes: Sequence[Mapping[str, int]] = ({},)  # symbol values, one run each
    gens: Mapping[str, Gen] = field(default_factory=dict)  # input name -> generator
    rtol: float = 1e-5
    atol: float = 1e-5
    kernel: Kernel | None = None
    graph: Graph | None = None

    def __post_init__(self) -> None:
        names = sorted({k for env in self.sizes for k in env})
        self.graph = Graph(tuple(self.inputs), tuple(self.outputs), {}, {s: SymDim(s, 1, 4096) for s in names})
        group = lambda g: [[n for n in g.nodes() if n.op not in (Op.INPUT, Op.WEIGHT)]]
        program = lower_to_program(self.graph, group)
        assert len(program.kernels) == 1, f"{self.name}: expected one kernel, got {list(program.kernels)}"
        (k,) = program.kernels.values()
        self.kernel = replace(k, name=self.name)


def build_cases(cases: Sequence[Case], report: dict | None = None):
    from llmc.backends.build import build_kernels, default_target

    kernels = {c.name: c.kernel for c in cases}
    assert len(kernels) == len(cases), "case names must be unique"
    return build_kernels(kernels, default_target(), report=report)


def _to_device(a: np.ndarray):
    import tvm

    if a.dtype.name == "bfloat16":  # numpy cannot export ml_dtypes through DLPack
        return tvm.runtime.tensor(a)
    return a


def run_case(ex, case: Case, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    k = case.kernel
    for env in case.sizes:
        arrays = {}
        for n in case.inputs:
            shape = tuple(evaluate(d, env) for d in n.shape)
            arrays[n.uid] = case.gens.get(n.attrs.name, default_gen)(rng, shape, n.dtype)
        expected = interpret(case.graph, [arrays[n.uid] for n in case.inputs])
        args = [_to_device(arrays[p.uid]) for p in k.params]
        outs = [np.zeros(tuple(evaluate(d, env) for d in o.shape), o.dtype.numpy) for o in k.outputs]
        dev_outs = [_to_device(o) for o in outs]
        ex.mod[k.name](*args, *dev_outs, *[env[s] for s in k.symbols])
        outs = [d.numpy() if d is not o else o for d, o in zip(dev_outs, outs)]
        by_uid = {o.uid: a for o, a in zip(k.outputs, outs)}
        for gi, go in enumerate(case.graph.outputs):
            got, want = by_uid[go.uid], expected[gi]
            assert got.shape == want.shape, f"{case.name} {env}: shape {got.shape} != {want.shape}"
            msg = f"{case.name} {env} output {gi}"
            if go.dtype.is_float:
                np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=case.rtol,
                                           atol=case.atol, err_msg=msg)
            else:
                np.testing.assert_array_equal(got, want, err_msg=msg)
