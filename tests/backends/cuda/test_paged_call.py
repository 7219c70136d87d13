"""backends/cuda/paged_call.py without a GPU: which prologues of the step function's paged
attention become part of its shim call (packed q | k | v read in place, q and k rotated in the
call), on hand-built graphs and on captured Hugging Face models. (The call's numbers are checked
on the GPU: test_paged_attention_gpu.py and tests/models/test_gpu_generate.py.)"""
from __future__ import annotations

import sys
import pathlib

import pytest

from llmc.backends.cuda.paged_call import prologue, rotary
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import TensorType, input_node, node, sym
from llmc.compiler.ops import AxisAttrs, Op, PermuteAttrs, ShapeAttrs, SliceAttrs

T = sym("tokens")
D, HQ, HK = 8, 4, 2
BSHD = PermuteAttrs((0, 2, 1, 3))


def _heads(X, lo, n):
    s = node(Op.SLICE, [X], SliceAttrs(2, lo * D, (lo + n) * D, 1))
    return node(Op.PERMUTE, [node(Op.RESHAPE, [s], ShapeAttrs((1, T, n, D)))], BSHD)


def _rope(y, cos, sin, half=D // 2, swap=False, neg_low=False):
    hi = node(Op.SLICE, [y], SliceAttrs(3, half, D, 1))
    lo = node(Op.SLICE, [y], SliceAttrs(3, 0, half, 1))
    parts = [node(Op.NEG, [hi]), lo] if not neg_low else [hi, node(Op.NEG, [lo])]
    cat = node(Op.CONCAT, parts, AxisAttrs(3))
    a, b = node(Op.MUL, [y, cos] if not swap else [cos, y]), node(Op.MUL, [cat, sin] if not swap else [sin, cat])
    return node(Op.ADD, [a, b] if not swap else [b, a])


def _paged(q, k, v, dtype=DType.BF16):
    wrap = lambda x: x if x.op is Op.PERMUTE else node(Op.PERMUTE, [node(Op.PERMUTE, [x], BSHD)], BSHD)
    ins = [wrap(q), wrap(k), v]
    ins += [input_node(n, TensorType(s, t)) for n, s, t in (
        ("kv_cache.0", (8, 2, 16, HK, D), dtype), ("page_table", (2, 4), DType.I32), ("kv_lens", (2,), DType.I32),
        ("q_starts", (3,), DType.I32))]
    from llmc.compiler.ops import PagedAttentionAttrs

    return node(Op.PAGED_ATTENTION, ins, PagedAttentionAttrs(scale=D ** -0.5, window=0, layer=0))


def _inputs(dtype=DType.BF16):
    X = input_node("qkv", TensorType((1, T, (HQ + 2 * HK) * D), dtype))
    cos = input_node("cos", TensorType((1, 1, T, D), dtype))
    sin = input_node("sin", TensorType((1, 1, T, D), dtype))
    return X, cos, sin


@pytest.mark.parametrize("swap", [False, True])
def test_rotated_packed_prologue_is_matched(swap):
    X, cos, sin = _inputs()
    q, k, v = _heads(X, 0, HQ), _heads(X, HQ, HK), _heads(X, HQ + HK, HK)
    a = _paged(_rope(q, cos, sin, swap=swap), _rope(k, cos, sin, swap=swap), v)
    pro = prologue(a)
    assert pro is not None and pro.qkv is X and pro.cos is cos and pro.sin is sin
    assert len(pro.nodes) == 2 * (2 + 7 + 3) + 3  # per rotated input: 2 permutes, the rotary, the head slice
    assert rotary(a.inputs[0].inputs[0].inputs[0]).y is q


def test_unrotated_packed_prologue_is_matched():
    X, _, _ = _inputs()
    a = _paged(_heads(X, 0, HQ), _heads(X, HQ, HK), _heads(X, HQ + HK, HK))
    pro = prologue(a)
    assert pro is not None and pro.cos is None and len(pro.nodes) == 9


@pytest.mark.parametrize("what", ["quarter rotation", "negated low half", "q only", "k before q", "other tables",
                                  "wide tables"])
def test_other_prologues_are_left_alone(what):
    X, cos, sin = _inputs()
    q, k, v = _heads(X, 0, HQ), _heads(X, HQ, HK), _heads(X, HQ + HK, HK)
    rq, rk = _rope(q, cos, sin), _rope(k, cos, sin)
    if what == "quarter rotation":  # not the rotate-half form
        rq, rk = _rope(q, cos, sin, half=D // 4), _rope(k, cos, sin, half=D // 4)
    elif what == "negated low half":  # GPT-J's sign, not rotate-half's
        rq, rk = _rope(q, cos, sin, neg_low=True), _rope(k, cos, sin, neg_low=True)
    elif what == "q only":  # the call rotates both or neither
        rk = k
    elif what == "k before q":  # heads not in q | k | v order
        q2, k2 = _heads(X, HK, HQ), _heads(X, 0, HK)
        rq, rk = _rope(q2, cos, sin), _rope(k2, cos, sin)
    elif what == "other tables":  # q and k rotated by different tables
        cos2 = input_node("cos2", TensorType((1, 1, T, D), DType.BF16))
        rk = _rope(k, cos2, sin)
    elif what == "wide tables":  # a table per head is not a [T, D] table
        cw = input_node("cw", TensorType((1, HQ, T, D), DType.BF16))
        rq = _rope(q, cw, sin)
    assert prologue(_paged(rq, rk, v)) is None


def test_absorbable_needs_the_output_transpose_in_the_group():
    """A packed call writes its output token-major, so the prologue joins it only where the output's
    head transpose is in the attention's group; and only where its nodes feed nothing else."""
    from llmc.backends.cuda.paged_call import absorbable
    from llmc.compiler.ir import Graph
    from llmc.compiler.symbolic import SymDim

    X, cos, sin = _inputs()
    q, k, v = _heads(X, 0, HQ), _heads(X, HQ, HK), _heads(X, HQ + HK, HK)
    a = _paged(_rope(q, cos, sin), _rope(k, cos, sin), v)
    out = node(Op.PERMUTE, [a], BSHD)
    ins = tuple(n for n in (X, cos, sin, *a.inputs[3:]))
    graph = Graph(ins, (out,), {}, {"tokens": SymDim("tokens", 1, 32)})
    users = graph.users()
    assert absorbable(a, {a.uid, out.uid}, users, set()) is not None
    assert absorbable(a, {a.uid}, users, set()) is None  # the transpose is another kernel's
    leaked = Graph(ins, (out, q), {}, {"tokens": SymDim("tokens", 1, 32)})  # q's heads also a graph output
    assert absorbable(a, {a.uid, out.uid}, leaked.users(), {q.uid}) is None


def _step_program(name, **cfg):
    """The CUDA program of a tiny bf16 causal LM's step function (no TVM build)."""
    import torch

    import llmc.api
    from llmc.backends.build_cuda import build_program
    from llmc.passes.pipeline import run_pipeline
    from llmc.passes.serve import StepSpec, derive_step
    from llmc.passes.simplify import simplify

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "helpers"))
    from causal_lms import VOCAB, tiny_causal_lm

    model = tiny_causal_lm(name, **cfg).to(torch.bfloat16)
    graph = llmc.api.capture(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 8))},
                             llmc.api.CompileOptions(dim_bounds={"batch": (1, 2), "seq": (1, 64)}))
    step, _ = derive_step(run_pipeline(graph)[0], StepSpec(page_size=16, max_tokens=32, max_seqs=4))
    prog, _ = build_program(step, passes=[simplify])
    return prog


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3"])
def test_step_attention_reads_the_qkv_output_and_rotates_in_the_call(name):
    """Llama: q | k | v read in place from the QKV GEMV's output, rotated in the paged call (no
    kernel between the two). Qwen2: the same (its QKV bias is the GEMV's epilogue). Phi-3
    (partial rotary, half the head): not the form the call covers, so a rotary kernel stays and
    the call reads what it wrote."""
    from llmc.backends.cuda.routes import match_route

    prog = _step_program(name, hidden_size=128, head_dim=32)
    kernels = [prog.kernels[c.kernel] for c in prog.calls]
    routes = [match_route(k) for k in kernels]
    paged = [r for r in routes if r and r.func.startswith("llmc_paged_attention")]
    assert len(paged) == 2
    rotating = [k for k, r in zip(kernels, routes) if any(n.op is Op.NEG for n in k.body)  # rotate-half's negation
                and not (r and r.func.startswith("llmc_paged_attention"))]
    for r in paged:
        if name == "phi3":
            assert r.func == "llmc_paged_attention" and not r.scalars[2] & 64
        else:
            assert r.func == "llmc_paged_attention_rope" and r.scalars[2] & 64 and r.scalars[2] & 15 == 15
            assert len(r.tensors) == 10 and r.tensors[0] == r.tensors[1] == r.tensors[2]
            assert "+rotary" in r.label and "packed-qkv" in r.label
    assert len(rotating) == (2 if name == "phi3" else 0), [k.name for k in rotating]
    if name != "phi3":  # per layer: norm + QKV (+ bias), paged attention, O, norm + gate/up + SwiGLU, down
        assert len(kernels) == 5 * 2 + 5, [k.name for k in kernels]  # + embedding, rotary tables, norm, rows, head
