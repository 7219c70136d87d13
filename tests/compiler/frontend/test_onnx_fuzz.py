"""Fuzzing the ONNX frontend: mutated real exports must import (and verify) or raise LLMCError.

A bounded-time loop mutates a tiny exported GPT-2 (protobuf bytes flipped or truncated;
op types, attributes, dims, initializers, tensor names and node order changed) and
feeds it to from_onnx. Anything other than a verifying Graph or an LLMCError is a bug.
Inputs that once crashed the importer are kept in onnx_cases/ and replayed.

A hypothesis test drives the same structural mutators through `st.randoms()`, so a
failure shrinks to a few mutation choices. For a longer run:

    LLMC_ONNX_FUZZ_SECONDS=600 LLMC_ONNX_FUZZ_EXAMPLES=20000 pytest tests/compiler/frontend/test_onnx_fuzz.py
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import random
import signal
import time
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import AttributeProto, TensorProto, helper, numpy_helper  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.compiler.frontend.onnx_rules import RULES  # noqa: E402
from llmc.compiler.verifier import verify  # noqa: E402
from llmc.errors import LLMCError  # noqa: E402

CASES = pathlib.Path(__file__).parent / "onnx_cases"
BUDGET_S = float(os.environ.get("LLMC_ONNX_FUZZ_SECONDS", "20"))
PER_CASE_S = 10  # a single import taking longer than this counts as a hang
INTERESTING = [-2**63, -2**31, -7, -2, -1, 0, 1, 2, 3, 5, 16, 2**31 - 1, 2**40, 2**63 - 1]
OP_TYPES = sorted({t for _, t in RULES}) + ["Bogus", "Loop", "If", "Conv"]


@contextlib.contextmanager
def _time_limit(seconds: int):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def boom(*_):
        raise TimeoutError(f"from_onnx ran over {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def import_or_llmc_error(data: bytes) -> str:
    """'ok' or 'error'; any other exception propagates (a bug)."""
    with _time_limit(PER_CASE_S), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            graph = from_onnx(data, default_bound=(1, 32))
        except LLMCError:
            return "error"
    verify(graph)  # outside the try: a graph that does not verify is a bug too
    return "ok"


# ---- the seed model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_model(tmp_path_factory) -> bytes:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32)
            self.m = transformers.GPT2LMHeadModel(cfg)

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("fuzz") / "gpt2.onnx")
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LM().eval(), (torch.zeros(1, 5, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64)),
                          path, dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes})
    data = pathlib.Path(path).read_bytes()
    assert import_or_llmc_error(data) == "ok"
    return data


# ---- mutations ------------------------------------------------------------------------------
def _names(m) -> list[str]:
    names = [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer]
    return names + [o for n in m.graph.node for o in n.output]


def mut_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["flip", "truncate", "splice", "zero"])
    if kind == "truncate":
        return bytes(b[:rng.randrange(len(b))])
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        if kind == "flip":
            b[i] ^= 1 << rng.randrange(8)
        elif kind == "zero":
            b[i] = 0
        else:
            j = rng.randrange(len(b))
            b[i:i + 4] = b[j:j + 4]
    return bytes(b)


def mut_op_type(rng, m):
    n = rng.choice(m.graph.node)
    n.op_type = rng.choice(OP_TYPES)
    if rng.random() < 0.1:
        n.domain = rng.choice(["com.microsoft", "ai.onnx", "custom"])


def mut_attribute(rng, m):
    nodes = [n for n in m.graph.node if len(n.attribute)]
    n = rng.choice(nodes)
    a = rng.choice(n.attribute)
    r = rng.random()
    if r < 0.1:
        n.attribute.remove(a)
    elif r < 0.2:
        a.type = rng.choice([AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING, AttributeProto.INTS,
                             AttributeProto.TENSOR, AttributeProto.GRAPH])
    elif a.type == AttributeProto.INT:
        a.i = rng.choice(INTERESTING)
    elif a.type == AttributeProto.INTS and len(a.ints):
        a.ints[rng.randrange(len(a.ints))] = rng.choice(INTERESTING)
    elif a.type == AttributeProto.FLOAT:
        a.f = rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf")])
    elif a.type == AttributeProto.TENSOR:
        _mut_tensor(rng, a.t)
    elif a.type == AttributeProto.STRING:
        a.s = rng.choice([b"", b"tanh", b"none", b"\xff\xfe"])
    if rng.random() < 0.2:
        n.attribute.add().CopyFrom(helper.make_attribute(rng.choice(["axis", "axes", "perm", "to", "value"]),
                                                         rng.choice(INTERESTING)))


def _mut_tensor(rng, t):
    r = rng.random()
    if r < 0.3 and t.data_type == TensorProto.INT64:  # shape constants: the importer folds these
        arr = numpy_helper.to_array(t).copy()
        if arr.size:
            arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice(INTERESTING)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    elif r < 0.5:
        t.data_type = rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 13, 16, 99])
    elif r < 0.7:
        if len(t.dims):
            t.dims[rng.randrange(len(t.dims))] = rng.choice(INTERESTING)
        else:
            t.dims.append(rng.choice([0, 1, 2, 3]))
    elif r < 0.8:
        del t.dims[:]
    else:
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]


def mut_initializer(rng, m):
    _mut_tensor(rng, rng.choice(m.graph.initializer))


def mut_constant(rng, m):
    """Replace a Constant's value by a random small integer or float tensor (shape constants)."""
    consts = [n for n in m.graph.node if n.op_type == "Constant"] or list(m.graph.node)
    n = rng.choice(consts)
    shape = rng.choice([(), (1,), (2,), (3,), (4,), (0,), (2, 2)])
    if rng.random() < 0.8:
        arr = np.array([rng.choice(INTERESTING) for _ in range(int(np.prod(shape)))], np.int64).reshape(shape)
    else:
        arr = np.array([rng.choice([0.0, -1.0, 0.5, 1e9, float("nan")]) for _ in range(int(np.prod(shape)))],
                       np.float32).reshape(shape)
    del n.attribute[:]
    n.attribute.add().CopyFrom(helper.make_attribute("value", numpy_helper.from_array(arr)))


def mut_swap_inputs(rng, m):
    n = rng.choice([n for n in m.graph.node if len(n.input) > 1] or list(m.graph.node))
    if len(n.input) > 1:
        i, j = rng.sample(range(len(n.input)), 2)
        n.input[i], n.input[j] = n.input[j], n.input[i]


def mut_input_name(rng, m):
    n = rng.choice(m.graph.node)
    names = _names(m)
    choice = rng.choice(names + ["", "undefined_tensor"])
    if len(n.input) and rng.random() < 0.7:
        n.input[rng.randrange(len(n.input))] = choice
    elif len(n.input) and rng.random() < 0.5:
        del n.input[rng.randrange(len(n.input))]
    else:
        n.input.append(choice)


def mut_output_name(rng, m):
    if rng.random() < 0.5:
        n = rng.choice(m.graph.node)
        if len(n.output):
            n.output[rng.randrange(len(n.output))] = rng.choice(_names(m) + ["", "fresh"])
    else:
        m.graph.output[0].name = rng.choice(_names(m))


def mut_graph_input(rng, m):
    inp = rng.choice(m.graph.input)
    tt = inp.type.tensor_type
    r = rng.random()
    if r < 0.2:
        tt.elem_type = rng.choice([1, 6, 7, 8, 9, 11, 0, 42])
    elif r < 0.3:
        tt.ClearField("shape")
    elif len(tt.shape.dim):
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        choice = rng.random()
        if choice < 0.4:
            d.dim_value = rng.choice([-1, 0, 1, 3])
        elif choice < 0.8:
            d.dim_param = rng.choice(["batch", "seq", "", "a b", "1x", "seq"])
        else:
            tt.shape.dim.add().dim_value = 2


def mut_nodes(rng, m):
    nodes = m.graph.node
    i, j = rng.randrange(len(nodes)), rng.randrange(len(nodes))
    r = rng.random()
    if r < 0.4:
        tmp = onnx.NodeProto()
        tmp.CopyFrom(nodes[i])
        nodes[i].CopyFrom(nodes[j])
        nodes[j].CopyFrom(tmp)
    elif r < 0.7:
        del nodes[i]
    else:
        nodes.add().CopyFrom(nodes[i])


def mut_opset(rng, m):
    m.opset_import[0].version = rng.choice([1, 11, 12, 13, 14, 17, 18, 20, 23, 26, 1000])
    if rng.random() < 0.3:
        m.opset_import[0].domain = rng.choice(["", "ai.onnx", "com.microsoft"])


STRUCTURAL = [mut_op_type, mut_op_type, mut_attribute, mut_attribute, mut_initializer, mut_constant,
              mut_constant, mut_swap_inputs, mut_input_name, mut_output_name, mut_graph_input, mut_nodes, mut_opset]


def mutate(rng: random.Random | int, data: bytes) -> bytes:
    rng = random.Random(rng) if isinstance(rng, int) else rng
    if rng.random() < 0.25:
        return mut_bytes(rng, data)
    m = onnx.ModelProto()
    m.ParseFromString(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        rng.choice(STRUCTURAL)(rng, m)
    return m.SerializeToString()


# ---- tests ----------------------------------------------------------------------------------
def test_fuzz_mutated_exports(seed_model, tmp_path):
    start = time.monotonic()
    seeds = 0
    outcomes = {"ok": 0, "error": 0}
    base = int(os.environ.get("LLMC_ONNX_FUZZ_BASE", "0"))
    while time.monotonic() - start < BUDGET_S:
        seed = base + seeds
        data = mutate(seed, seed_model)
        try:
            outcomes[import_or_llmc_error(data)] += 1
        except Exception as e:
            crash = tmp_path / f"crash_seed{seed}.onnx"
            crash.write_bytes(data)
            raise AssertionError(f"seed {seed}: from_onnx raised {type(e).__name__}: {e} (input saved to {crash}; "
                                 f"add it to {CASES})") from e
        seeds += 1
    assert seeds > 20 and outcomes["error"] > 0, outcomes


@settings(max_examples=int(os.environ.get("LLMC_ONNX_FUZZ_EXAMPLES", "500")), deadline=None, derandomize=True,
          database=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_structural_hypothesis(seed_model, rng):
    """The same mutators driven by hypothesis, which shrinks a failure to few mutation choices."""
    m = onnx.ModelProto()
    m.ParseFromString(seed_model)
    for _ in range(rng.choice([1, 2, 3])):
        rng.choice(STRUCTURAL)(rng, m)
    import_or_llmc_error(m.SerializeToString())


def test_replay_regression_cases():
    files = sorted(CASES.glob("*.onnx"))
    assert files, f"no regression cases in {CASES}"
    for f in files:
        import_or_llmc_error(f.read_bytes())
