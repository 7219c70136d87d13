"""Attention in llmc's CPU kernel library (backends/cpu_gemm/llmc_attention.cc,
backends/cpu_attention.py, runtime/cpu_attention.py) against a float64 numpy reference on fresh
random inputs (absolute 2e-6 on outputs of magnitude ~1, fp32), over what the kernel must get
right: causal with S < T and S > T (rows that see no key give zeros), grouped-query heads, head
dims that are not multiples of 16 or exceed a 64-column tile, bool and float masks that
broadcast, fully masked rows, one and two threads; the numpy fallback; the grouping before and
after; and compiled models (GPT-2, BERT with padding) against torch eager."""
import numpy as np
import pytest
import torch

import llmc
from llmc.backends.cpu_attention import match_attention
from llmc.backends.cpu_blas import cpu_grouping
from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym
from llmc.compiler.ops import AttentionAttrs, Op, PermuteAttrs, ShapeAttrs
from llmc.compiler.program import lower_to_program
from llmc.compiler.symbolic import SymDim
from llmc.errors import LLMCError
from llmc.runtime.cpu_attention import MASK_KINDS, AttentionCall, attention_numpy
from llmc.runtime.cpu_gemm import Sgemm
from llmc.runtime.manifest import Manifest

from cpu_kernels import kernel_library, needs_avx512  # tests/helpers


@pytest.fixture(scope="module")
def sgemm() -> Sgemm:
    return kernel_library()


def _reference(q, k, v, mask, scale, causal):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, 1), np.repeat(v, g, 1)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    S, T = s.shape[-2:]
    ok = np.ones((S, T), bool)
    if causal:
        ok = np.arange(T)[None] <= np.arange(S)[:, None] + (T - S)
    ok = np.broadcast_to(ok, s.shape)
    if mask is not None and mask.dtype == np.bool_:
        ok = ok & np.broadcast_to(mask, s.shape)
    elif mask is not None:
        s = s + mask
    s = np.where(ok, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.where(ok, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    z = e.sum(-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", e, v) / np.where(z == 0, 1, z)


class _Spec:
    def __init__(self, scale, causal, mask):
        self.scalars = (scale, int(causal), MASK_KINDS[mask])


CASES = [  # b, h, hk, s, t, d, dv, causal, mask
    (2, 4, 4, 128, 128, 64, 64, True, ""),  # GPT-2's shape, smaller
    (1, 8, 2, 37, 53, 24, 40, True, ""),  # S < T (a continued prefix), grouped heads, odd dims
    (1, 2, 2, 20, 6, 16, 16, True, ""),  # S > T: the first 14 rows see no key
    (2, 3, 3, 5, 70, 16, 100, False, "bool"),  # Dv over one 64-column tile; a key-padding mask
    (2, 2, 1, 9, 9, 8, 20, False, "float32"),  # an additive [1, S, T] mask
    (3, 2, 2, 17, 33, 32, 32, True, "bool"),  # causal and a mask, fully masked rows
    (1, 1, 1, 1, 300, 64, 64, False, ""),  # one query row over many keys
]


def _inputs(case, seed):
    b, h, hk, s, t, d, dv, causal, mask = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, s, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, t, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, t, dv), dtype=np.float32)
    m = None
    if mask == "bool":
        m = rng.random((b, 1, 1, t)) > 0.3
        m[0, 0, 0, :] = False  # batch 0 sees no key at all
    elif mask == "float32":
        m = (rng.standard_normal((1, s, t)) * 2).astype(np.float32)
    return q, k, v, m, 1 / np.sqrt(d)


@needs_avx512
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_library_matches_reference(sgemm, case, threads):
    q, k, v, m, scale = _inputs(case, seed=threads)
    sgemm.threads = threads
    call = AttentionCall(_Spec(scale, case[7], case[8]), sgemm)
    out = np.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), np.nan, np.float32)
    call([q, k, v] + ([m] if m is not None else []) + [out], {})
    np.testing.assert_allclose(out, _reference(q, k, v, m, scale, case[7]), atol=2e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_numpy_fallback_matches_reference(case):
    q, k, v, m, scale = _inputs(case, seed=5)
    call = AttentionCall(_Spec(scale, case[7], case[8]), None)  # no library: numpy
    out = np.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), np.nan, np.float32)
    call([q, k, v] + ([m] if m is not None else []) + [out], {})
    np.testing.assert_allclose(out, _reference(q, k, v, m, scale, case[7]), atol=2e-6, rtol=0)


def test_mismatched_shapes_are_refused():
    q, k, v, _, scale = _inputs(CASES[0], seed=0)
    out = np.empty((2, 4, 128, 32), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        AttentionCall(_Spec(scale, True, ""), None)([q, k, v, out], {})


def _attention_graph(distinct: bool) -> Graph:
    """x [b, s, 32] -> split into heads (reshape + permute) -> causal attention -> merged back;
    q, k and v one node, or three."""
    b, s = sym("batch"), sym("seq")
    x = input_node("x", TensorType((b, s, 32), DType.F32))

    def heads(t):
        return node(Op.PERMUTE, [node(Op.RESHAPE, [t], ShapeAttrs((b, s, 4, 8)))], PermuteAttrs((0, 2, 1, 3)))

    q = heads(node(Op.ADD, [x, x]))
    k, v = (heads(node(Op.MUL, [x, x])), heads(x)) if distinct else (q, q)
    a = node(Op.ATTENTION, [q, k, v], AttentionAttrs(0.35, True, False))
    y = node(Op.RESHAPE, [node(Op.PERMUTE, [a], PermuteAttrs((0, 2, 1, 3)))], ShapeAttrs((b, s, 32)))
    return Graph((x,), (y,), {}, {"batch": SymDim("batch", 1, 4), "seq": SymDim("seq", 1, 32)}, ("y",))


def _ops(groups):
    return [[n.op for n in g] for g in groups]


@pytest.mark.parametrize("distinct", [True, False])
def test_grouping_before_after_puts_attention_alone(distinct):
    g = _attention_graph(distinct)
    before, after = _ops(cpu_grouping(g)), _ops(cpu_grouping(g, attention=True))
    # before: TVM's attention kernel with the head split fused into its loads
    assert any(Op.ATTENTION in k and Op.PERMUTE in k for k in before)
    assert [Op.ATTENTION] in after  # after: alone, the head split an elementwise kernel before it
    kernels = lower_to_program(g, lambda graph: cpu_grouping(graph, attention=True)).kernels.values()
    att = [k for k in kernels if any(n.op is Op.ATTENTION for n in k.body)]
    route = match_attention(att[0])
    if distinct:
        assert route is not None and route.causal and route.mask == "" and route.scale == pytest.approx(0.35)
    else:  # q = k = v: one kernel parameter read three times, not the library's argument list
        assert route is None


def _gpt2(n_head=4):
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=n_head, vocab_size=301, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@needs_avx512
def test_gpt2_attention_runs_in_the_library():
    model = _gpt2()
    ex = {"input_ids": torch.randint(0, 301, (2, 8)), "use_cache": False}
    cm = llmc.compile(model, (), ex, dim_bounds={"batch": (1, 4), "seq": (1, 64)})
    routes = [k.get("route") for k in cm.manifest["program"]["kernels"].values()]
    assert routes.count("attn") == 1  # one kernel, called once per layer
    assert sum(cm.manifest["program"]["kernels"][c["kernel"]].get("route") == "attn"
               for c in cm.manifest["program"]["calls"]) == 2
    for shape in [(1, 1), (1, 13), (3, 64)]:
        ids = torch.randint(0, 301, shape)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.numpy()
        np.testing.assert_allclose(cm(input_ids=ids.numpy())[0], ref, atol=1e-4, rtol=1e-4)


@needs_avx512
def test_bert_padding_mask_runs_in_the_library():
    import transformers

    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(1)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 200, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 3:] = 0
    cm = llmc.compile(model, (), {"input_ids": ids, "attention_mask": mask},
                      dim_bounds={"batch": (1, 4), "seq": (1, 64)})
    kernels = cm.manifest["program"]["kernels"].values()
    assert any(k.get("route") == "attn" and k["scalars"][2] != 0 for k in kernels)  # with its mask
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    np.testing.assert_allclose(cm(input_ids=ids.numpy(), attention_mask=mask.numpy())[0], ref, atol=1e-4, rtol=1e-4)


@needs_avx512
@pytest.mark.parametrize("path,value,message", [
    ("func", "flash", "unknown attn function"),
    ("scalars", [0.125, 2, 0], "attention takes scalars"),
    ("scalars", [0.125, 1], "attention takes scalars"),
    ("scalars", [-1.0, 1, 0], "attention takes scalars"),
    ("tensors", [], "attention reads its call's 4 arguments"),
])
def test_manifest_refuses_a_wrong_attn_kernel(path, value, message):
    model = _gpt2()
    cm = llmc.compile(model, (), {"input_ids": torch.randint(0, 301, (1, 4)), "use_cache": False},
                      dim_bounds={"batch": (1, 2), "seq": (1, 16)})
    m = cm.manifest
    name = next(n for n, k in m["program"]["kernels"].items() if k.get("route") == "attn")
    Manifest.from_json(m, "ok")  # as compiled: accepted
    m["program"]["kernels"][name][path] = value
    with pytest.raises(LLMCError, match=message):
        Manifest.from_json(m, "corrupt")
