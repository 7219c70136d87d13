"""End to end: real HF model code (random weights; real MiniLM weights) through
llmc.compile with fusion, against torch eager in fp32, one compile for several shapes."""
import numpy as np
import pytest
import torch

import llmc
from llmc.compiler.frontend.hf_models import DECODERS, tiny_model

SHAPES = [(1, 7), (2, 16)]
BOUNDS = {"batch": (1, 4), "seq": (1, 64)}


def _inputs(name, model, b, s, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1:
        mask[1, s - 3:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2", "mistral", "bert", "minilm"])
def compiled(request):
    name = request.param
    model, kwargs = tiny_model(name)
    return name, model, llmc.compile(model, (), kwargs, dim_bounds=BOUNDS)


def test_matches_torch_eager(compiled):
    name, model, cm = compiled
    for i, (b, s) in enumerate(SHAPES):
        kw = _inputs(name, model, b, s, seed=10 + i)
        with torch.no_grad():
            ref = model(**kw, **({"use_cache": False} if name in DECODERS else {}))
        ref0 = (ref.logits if name in DECODERS else ref.last_hidden_state).numpy()
        got = cm(**{k: v.numpy() for k, v in kw.items()})
        assert got[0].shape == ref0.shape
        err = np.abs(got[0] - ref0).max()
        assert err <= 1e-4, f"{name} {b}x{s}: max abs error {err:.2e}"


def test_every_attention_and_norm_fused(compiled):
    name, model, cm = compiled
    ops = {n.op.name for n in cm.program.graph.nodes()}
    assert "ATTENTION" in ops
    assert "SOFTMAX" not in ops
    assert ("RMS_NORM" if name in ("llama", "qwen2", "mistral") else "LAYER_NORM") in ops
    per_layer = {k: v for k, v in cm.program.notes["kernels_per_layer"].items() if k is not None}
    assert len(per_layer) == model.config.num_hidden_layers  # every layer recognised
    # per layer: 4 GEMMs (BLAS calls), 2 norms, attention (a call of llmc's CPU kernel library)
    # with its rotary/bias prologue (q and k, v: up to two kernels) and the head merge after it,
    # the MLP's activation, 2 residual adds; the rotary tables and mask count in layer 0
    assert max(per_layer.values()) <= 12, per_layer


def test_minilm_sentence_embeddings():
    model, _ = tiny_model("minilm")
    kw = _inputs("minilm", model, 2, 12, seed=3)
    cm = llmc.compile(model, (), _inputs("minilm", model, 2, 8, seed=4), dim_bounds=BOUNDS)
    hidden = cm(**{k: v.numpy() for k, v in kw.items()})[0]
    with torch.no_grad():
        ref = model(**kw).last_hidden_state.numpy()
    m = kw["attention_mask"].numpy()[..., None].astype(np.float64)

    def embed(h):
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    cos = (embed(hidden) * embed(ref)).sum(-1)
    assert cos.min() >= 0.99999, cos
