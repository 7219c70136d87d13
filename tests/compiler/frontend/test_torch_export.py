"""The torch.export frontend on real Hugging Face graphs: each model is exported once with
dynamic batch and seq, and that one graph must match torch eager at several shapes."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from llmc.compiler.frontend.hf_models import DECODERS, TINY_MODELS, minilm_path, tiny_model
from llmc.compiler.frontend.torch_export import from_torch
from llmc.compiler.interpreter import interpret
from llmc.compiler.ops import Op
from llmc.compiler.verifier import verify

pytestmark = pytest.mark.slow
SHAPES = [(1, 7), (2, 7), (1, 16), (2, 16)]


@functools.lru_cache(maxsize=None)
def converted(name: str):
    model, kwargs = tiny_model(name)
    return model, kwargs, from_torch(model, (), kwargs)


def _inputs(batch: int, seq: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, -3:] = 0  # a zero-padded row
    return ids, mask


def _torch_outputs(name, model, kwargs, ids, mask):
    with torch.no_grad():
        out = model(**dict(kwargs, input_ids=ids, attention_mask=mask))
    if name in DECODERS:
        return [out.logits]
    return [out.last_hidden_state, out.pooler_output]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_graph_is_well_formed(name):
    model, kwargs, graph = converted(name)
    verify(graph)
    assert [n.attrs.name for n in graph.inputs] == ["input_ids", "attention_mask"]
    assert all(str(n.type) == "i64[batch, seq]" for n in graph.inputs)
    assert (graph.symbols["batch"].lo, graph.symbols["batch"].hi) == (1, 64)
    assert (graph.symbols["seq"].lo, graph.symbols["seq"].hi) == (1, 512)
    expected = ("logits",) if name in DECODERS else ("last_hidden_state", "pooler_output")
    assert graph.output_names == expected
    state = {**dict(model.named_buffers()), **model.state_dict()}  # non-persistent buffers too
    for key, arr in graph.params.items():  # weights keep their state-dict names and values
        assert key in state or key.startswith("lifted_tensor"), key
        if key in state:
            np.testing.assert_array_equal(arr, state[key].numpy())
    ops = {n.op for n in graph.nodes()}
    assert Op.ATTENTION in ops and Op.MATMUL in ops


@pytest.mark.parametrize("batch, seq", SHAPES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_matches_torch(name, batch, seq):
    model, kwargs, graph = converted(name)
    vocab = 1000 if name == "minilm" else 128
    ids, mask = _inputs(batch, seq, vocab, seed=batch * 100 + seq)
    ours = interpret(graph, [ids.numpy(), mask.numpy()])
    ref = _torch_outputs(name, model, kwargs, ids, mask)
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert o.shape == tuple(r.shape) and o.dtype == np.float32
        assert np.abs(o - r.numpy()).max() <= 1e-4


def test_minilm_sentence_embeddings():
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    sentences = ["The cat sits on the mat.", "A compiler lowers transformer graphs to fast kernels for GPUs."]
    tok = st.tokenize(sentences)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert (mask == 0).any()  # the shorter sentence is zero-padded
    hidden = interpret(converted("minilm")[2], [ids.numpy(), mask.numpy()])[0].astype(np.float64)
    m = mask.numpy()[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)  # sentence-transformers mean pooling
    ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    ref = st.encode(sentences, convert_to_numpy=True, normalize_embeddings=True).astype(np.float64)
    cosine = (ours * ref).sum(-1) / np.linalg.norm(ref, axis=-1)
    assert cosine.min() >= 0.99999, cosine


def test_batch_one_example_with_use_cache_on_keeps_dims_symbolic():
    """The most natural call: one sequence of one token, a config with use_cache=True and
    no use_cache argument. The example is tiled for the capture; the graph keeps batch
    and seq symbolic, matches torch at other shapes, and the config is left as it was."""
    model, _ = tiny_model("llama")
    model.config.use_cache = True
    ids = torch.randint(3, 128, (1, 1), generator=torch.Generator().manual_seed(1))
    graph = from_torch(model, (ids,), dim_bounds={"batch": (1, 4), "seq": (1, 32)})
    assert model.config.use_cache is True
    assert [str(n.type) for n in graph.inputs] == ["i64[batch, seq]"]
    assert (graph.symbols["batch"].lo, graph.symbols["seq"].lo) == (1, 1)
    for batch, seq in [(1, 1), (1, 9), (3, 5)]:
        x = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(batch * 10 + seq))
        with torch.no_grad():
            ref = model(x, use_cache=False).logits.numpy()
        (ours,) = interpret(graph, [x.numpy()])
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-4


def test_tile_unit_dims_keeps_values_valid():
    from llmc.compiler.frontend.torch_export import tile_unit_dims

    ids, mask, scalar = torch.tensor([[5]]), torch.ones(1, 3, dtype=torch.long), torch.tensor(2.0)
    (a,), kw = tile_unit_dims((ids,), {"attention_mask": mask, "s": scalar, "flag": False})
    assert a.tolist() == [[5, 5], [5, 5]] and kw["attention_mask"].shape == (2, 3)
    assert kw["s"] is scalar and kw["flag"] is False  # rank < 2 and non-tensors are untouched


def test_size_zero_example_is_a_clear_error():
    from llmc.errors import LLMCError

    model, _ = tiny_model("llama")
    with pytest.raises(LLMCError, match="specializes dims of size 0/1"):
        from_torch(model, (torch.zeros(0, 4, dtype=torch.long),))
