"""passes/index_bounds.py: index ranges of graph inputs, and symbol bounds lowered to fit tables.

Hand-built graphs first (each shift/trace rule, before and after the pass), then graphs
captured from Hugging Face models with random weights, then a compiled GPT-2 whose position
table is shorter than the requested seq bound.
"""
import dataclasses

import numpy as np
import pytest

from llmc.compiler import ir
from llmc.compiler.interpreter import interpret
from llmc.compiler.ops import AxisAttrs, Op
from llmc.compiler.symbolic import SymDim
from llmc.errors import LLMCError
from llmc.passes.index_bounds import IndexCheck, bound_symbols_by_tables, input_index_checks
from llmc.passes.pipeline import DEFAULT_PIPELINE
from pass_graphs import F32, GB, I64

I32 = type(I64)("int32")


def take(g: GB, table, idx, axis=0):
    return ir.node(Op.TAKE, [table, idx], AxisAttrs(axis))


def ids_graph(transform, rows=10, seq_hi=16, index_only=False):
    """emb[transform(ids)] for ids: i64[b, s] (or transform(ids) alone)."""
    g = GB(seq_hi=seq_hi)
    ids = g.input("ids", (ir.sym("b"), ir.sym("s")), I64)
    emb = g.weight("emb", (rows, 4))
    idx = transform(g, ids)
    return g.graph(idx if index_only else take(g, emb, idx))


# ---- input_index_checks ---------------------------------------------------------------------
def test_plain_embedding_lookup():
    graph = ids_graph(lambda g, ids: ids)
    assert input_index_checks(graph) == (IndexCheck("ids", 0, 10, "emb (10 rows)"),)


@pytest.mark.parametrize("transform, lo, hi", [
    (lambda g, ids: g.cast(g.reshape(ids, (ir.sym("b") * ir.sym("s"),)), I32), 0, 10),  # value-preserving
    (lambda g, ids: g.op(Op.SUB, ids, g.c(3, I64)), 3, 13),  # ids - 3: ids 3..12 index rows 0..9
    (lambda g, ids: g.op(Op.ADD, g.c(2, I64), ids), 0, 8),  # 2 + ids: negative ids refused anyway
    (lambda g, ids: g.op(Op.SUB, g.c(5, I64), ids), 0, 6),  # 5 - ids: rows 5..0 (negative ids refused)
    (lambda g, ids: g.op(Op.NEG, g.op(Op.SUB, ids, g.c(12, I64))), 3, 13),  # 12 - ids
    (lambda g, ids: g.permute(g.expand(g.reshape(ids, (ir.sym("b"), ir.sym("s"), 1)),
                                       (ir.sym("b"), ir.sym("s"), 3)), (2, 0, 1)), 0, 10),
])
def test_checks_follow_casts_views_and_shifts(transform, lo, hi):
    graph = ids_graph(transform)
    (check,) = input_index_checks(graph)
    assert (check.input, check.lo, check.hi) == ("ids", lo, hi)
    # the range is exact: the indices its values give are rows of the table, and one past
    # its ends (or any negative id) gives an index outside [0, 10)
    index_of = ids_graph(transform, index_only=True)
    inside = np.arange(lo, hi, dtype=np.int64)[None]
    got = interpret(index_of, [inside])[0]
    assert got.min() >= 0 and got.max() < 10
    for bad in (lo - 1, hi):
        got = interpret(index_of, [np.array([[bad]], np.int64)])[0]
        assert bad < 0 or not (0 <= got.min() and got.max() < 10), bad


def test_checks_on_one_input_intersect_and_name_the_binding_table():
    g = GB()
    ids = g.input("ids", (ir.sym("b"), ir.sym("s")), I64)
    big, small = g.weight("big", (10, 4)), g.weight("small", (6, 4))
    shifted = g.op(Op.ADD, ids, g.c(1, I64))  # small[ids + 1]: ids < 5
    graph = g.graph(g.add(take(g, big, ids), take(g, small, shifted)))
    assert input_index_checks(graph) == (IndexCheck("ids", 0, 5, "small (6 rows)"),)
    # ends from two tables: ids - 2 must be a row of `small` (ids >= 2), ids a row of `tiny`
    tiny = g.weight("tiny", (4, 4))
    graph = g.graph(g.add(take(g, small, g.op(Op.SUB, ids, g.c(2, I64))), take(g, tiny, ids)))
    assert input_index_checks(graph) == (IndexCheck("ids", 2, 4, "small (6 rows); tiny (4 rows)"),)


def test_gather_and_index_axes():
    g = GB()
    x = g.input("x", (ir.sym("b"), 7), F32)
    rows = g.input("rows", (ir.sym("b"), 2), I64)
    pick = g.input("pick", (3,), I64)
    table = g.weight("tab", (5, 9))
    gathered = ir.node(Op.GATHER, [x, rows], AxisAttrs(1))
    indexed = ir.node(Op.INDEX, [table, pick, pick])  # tab[pick, pick]: pick < 5 and < 9
    graph = g.graph(gathered, indexed)
    assert input_index_checks(graph) == (
        IndexCheck("rows", 0, 7, "the input indexed by GATHER at <graph> (7 entries on axis 1)"),
        IndexCheck("pick", 0, 5, "tab (5 rows)"))


def test_no_check_where_the_index_is_not_a_plain_function_of_an_input():
    g = GB()
    ids = g.input("ids", (ir.sym("b"), ir.sym("s")), I64)
    emb = g.weight("emb", (10, 4))
    doubled = g.op(Op.MUL, ids, g.c(2, I64))  # not a shift: left alone
    seq_table = g.input("h", (ir.sym("b"), ir.sym("s"), 4), F32)  # symbolic axis: no static size
    pos = g.arange(ir.sym("s"))
    graph = g.graph(take(g, emb, doubled), take(g, seq_table, pos, axis=1))
    assert input_index_checks(graph) == ()


# ---- bound_symbols_by_tables -----------------------------------------------------------------
def positions_graph(end, rows=8, shift=0, seq_hi=16):
    g = GB(seq_hi=seq_hi)
    x = g.input("x", (ir.sym("b"), ir.sym("s"), 4), F32)
    pos = g.arange(end)
    if shift:
        pos = g.op(Op.ADD, pos, g.c(shift, I64))
    wpe = g.weight("wpe", (rows, 4))
    if not isinstance(end, int) and end != ir.sym("s"):
        pos = g.slice(pos, 0, 0, ir.sym("s"))
    return g.graph(g.add(x, take(g, wpe, g.reshape(pos, (1, ir.sym("s"))))))


def test_arange_positions_lower_the_seq_bound():
    graph = positions_graph(ir.sym("s"))
    assert graph.symbols["s"].hi == 16
    out, report = bound_symbols_by_tables(graph)
    assert out.symbols["s"] == SymDim("s", 1, 8) and out.symbols["b"] == graph.symbols["b"]
    assert graph.symbols["s"].hi == 16  # pure: the input graph is unchanged
    assert report.lines == ["s bound lowered 16 -> 8: wpe has 8 rows"] and report.counts == {"symbols_lowered": 1}
    # before: s = 9 runs past the table; after: 8 is the longest that fits
    x9 = np.zeros((1, 9, 4), np.float32)
    with pytest.raises(IndexError):
        interpret(graph, [x9])
    interpret(out, [x9[:, :8]])


def test_offset_and_symbolic_ends():
    out, rep = bound_symbols_by_tables(positions_graph(ir.sym("s"), rows=10, shift=2))  # OPT-style +2
    assert out.symbols["s"].hi == 8, rep
    out, rep = bound_symbols_by_tables(positions_graph(ir.sym("s") + 1, rows=8))  # arange(s + 1)[:s]
    assert out.symbols["s"].hi == 7, rep


def test_big_enough_table_changes_nothing():
    graph = positions_graph(ir.sym("s"), rows=32)
    out, report = bound_symbols_by_tables(graph)
    assert out is graph and not report.lines


def test_no_seq_fits_is_an_error():
    graph = positions_graph(ir.sym("s"), rows=2)
    graph = dataclasses.replace(graph, symbols={**graph.symbols, "s": SymDim("s", 4, 16)})
    with pytest.raises(LLMCError, match=r"no s in its bounds \[4, 16\] fits: wpe has 2 rows"):
        bound_symbols_by_tables(graph)


def test_slice_of_a_position_buffer():
    """BERT: position_ids buffer [1, 12] sliced [:, :s], then a 10-row table: s <= 10."""
    g = GB()
    x = g.input("x", (ir.sym("b"), ir.sym("s"), 4), F32)
    buf = g.weight("position_ids", (1, 12), I64)
    g.params["position_ids"] = np.arange(12, dtype=np.int64)[None]
    pos = g.slice(buf, 1, 0, ir.sym("s"))
    graph = g.graph(g.add(x, take(g, g.weight("wpe", (10, 4)), pos)))
    out, report = bound_symbols_by_tables(graph)
    assert out.symbols["s"].hi == 10
    assert report.lines == ["s bound lowered 16 -> 10: position_ids[..., :10] indexes wpe (10 rows)"]
    # with a long enough table the slice itself (12 long) still bounds s
    graph12 = g.graph(g.add(x, take(g, g.weight("wpe2", (40, 4)), pos)))
    out, report = bound_symbols_by_tables(graph12)
    assert out.symbols["s"].hi == 12 and "position_ids is sliced up to it on axis 1" in report.lines[0]


def test_registered_first_in_the_pipeline():
    assert DEFAULT_PIPELINE[0] is bound_symbols_by_tables


# ---- graphs captured from Hugging Face models ------------------------------------------------
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = 97


def _capture(model, kwargs, **kw):
    from llmc.compiler.frontend.torch_export import from_torch

    return from_torch(model.eval(), (), kwargs, **kw)


def _gpt2(n_positions=256):
    T = transformers
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                          n_positions=n_positions, bos_token_id=1, eos_token_id=2,
                                          attn_implementation="sdpa")).eval()


def _ids(b, s, seed):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_hf_gpt2_checks_and_seq_bound():
    graph = _capture(_gpt2(), {"input_ids": _ids(2, 8, 0), "use_cache": False})
    assert graph.symbols["seq"].hi == 512  # what the frontend asks for by default
    (check,) = input_index_checks(graph)
    assert (check.input, check.lo, check.hi) == ("input_ids", 0, VOCAB) and f"({VOCAB} rows)" in check.table
    out, report = bound_symbols_by_tables(graph)
    assert out.symbols["seq"].hi == 256
    assert report.lines == ["seq bound lowered 512 -> 256: transformer.wpe.weight has 256 rows"]


def test_hf_bert_checks_token_types_and_position_buffer():
    T = transformers
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128, type_vocab_size=3,
                                     attn_implementation="sdpa"))
    kwargs = {"input_ids": _ids(2, 8, 1), "token_type_ids": torch.randint(0, 3, (2, 8)),
              "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.warns(UserWarning, match="narrower bounds"):  # torch.export's own guard on the buffer slice
        graph = _capture(model, kwargs)
    checks = {c.input: c for c in input_index_checks(graph)}
    assert set(checks) == {"input_ids", "token_type_ids"}
    assert (checks["input_ids"].lo, checks["input_ids"].hi) == (0, VOCAB)
    assert checks["token_type_ids"] == IndexCheck("token_type_ids", 0, 3,
                                                  "embeddings.token_type_embeddings.weight (3 rows)")
    # torch.export already narrows seq to the position_ids buffer here; widened (as an ONNX
    # import with --seq-len 512 would give), the pass brings it back to the table
    assert graph.symbols["seq"].hi == 128
    wide = dataclasses.replace(graph, symbols={**graph.symbols, "seq": SymDim("seq", 1, 512)})
    out, report = bound_symbols_by_tables(wide)
    assert out.symbols["seq"].hi == 128, report
    assert "embeddings.position_ids" in report.lines[0] and "128" in report.lines[0]


def test_hf_llama_checks_ids_and_keeps_seq():
    T = transformers
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                             max_position_embeddings=64, attn_implementation="sdpa"))
    graph = _capture(model, {"input_ids": _ids(2, 8, 2), "use_cache": False})
    (check,) = input_index_checks(graph)
    assert (check.input, check.lo, check.hi) == ("input_ids", 0, VOCAB)
    out, report = bound_symbols_by_tables(graph)  # rotary positions index no table
    assert out is graph and out.symbols["seq"].hi == 512


@pytest.fixture(scope="module")
def compiled_gpt2():
    import llmc

    model = _gpt2()
    cm = llmc.compile(model, (), {"input_ids": _ids(2, 8, 3), "use_cache": False},
                      dim_bounds={"batch": (1, 2), "seq": (1, 512)})
    return model, cm


def test_compiled_gpt2_refuses_seq_past_its_positions(compiled_gpt2):
    import llmc

    model, cm = compiled_gpt2
    assert {s["name"]: s["hi"] for s in cm.manifest["program"]["symbols"]}["seq"] == 256
    assert "seq bound lowered 512 -> 256: transformer.wpe.weight has 256 rows" in cm.report
    # the checks survive the fusion pipeline (the manifest is built from the optimised graph)
    (check,) = input_index_checks(cm.program.graph)
    assert (check.input, check.lo, check.hi) == ("input_ids", 0, VOCAB)
    with pytest.raises(llmc.InputError, match="seq"):
        cm(input_ids=_ids(1, 300, 4).numpy())


def test_compiled_gpt2_matches_torch_at_the_full_table(compiled_gpt2):
    model, cm = compiled_gpt2
    ids = _ids(1, 256, 5)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    got = cm(input_ids=ids.numpy())[0]
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max()
    assert err <= 1e-4, f"max abs error {err:.2e}"


def test_unfused_compile_lowers_the_bound_too():
    from llmc.api import CompileOptions, compile_graph

    cm = compile_graph(positions_graph(ir.sym("s")), CompileOptions(fuse=False))
    assert {s["name"]: s["hi"] for s in cm.manifest["program"]["symbols"]}["s"] == 8
    assert "s bound lowered 16 -> 8" in cm.report


def test_onnx_bert_seq_bound_from_its_position_buffer(tmp_path):
    """An ONNX import takes the seq bound it is given (--seq-len 512): the pass brings it back
    to the 64 positions the exported BERT has."""
    pytest.importorskip("onnx")
    from onnx_export import export_onnx

    from llmc.compiler.frontend.onnx import from_onnx

    path = str(tmp_path / "bert.onnx")
    export_onnx("bert", "torchscript", path)
    graph = from_onnx(path, dim_bounds={"batch": (1, 4), "seq": (1, 512)})
    (check,) = input_index_checks(graph)
    assert (check.input, check.lo, check.hi) == ("input_ids", 0, 128)
    out, report = bound_symbols_by_tables(graph)
    assert graph.symbols["seq"].hi == 512 and out.symbols["seq"].hi == 64, report
    assert report.lines[0].startswith("seq bound lowered 512 -> 64: ")


def test_exported_gpt2_refuses_ids_outside_its_vocabulary(compiled_gpt2, tmp_path):
    """The checks reach the artifact (manifest section input_checks) and the runtime alone
    enforces them: ids past the vocabulary or negative are an InputError, not garbage."""
    import llmc

    model, cm = compiled_gpt2
    run = llmc.load(cm.export(tmp_path / "gpt2.llmc"))
    ids = _ids(2, 8, 5).numpy()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(run(input_ids=ids)[0], want, atol=1e-4, rtol=0)
    for bad in (VOCAB, 10**6, 2**31, -1):
        wrong = ids.copy()
        wrong[1, 3] = bad
        with pytest.raises(llmc.InputError, match=f"input_ids.*{bad}"):
            run(input_ids=wrong)
