"""`llmc compile` sources in process: Hugging Face folders (eager attention where a model
has no SDPA), bundled names, Hub ids."""
import numpy as np
import pytest
import torch

import llmc
from llmc.errors import LLMCError
from llmc.sources import bundled_names, resolve


def _save_tiny(family: str, folder):
    import transformers as T

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64, head_dim=16)
    if family == "gemma":
        cls, config, attention = T.GemmaForCausalLM, T.GemmaConfig(**common), "sdpa"
    else:  # Gemma-2 has no SDPA attention in transformers: only eager
        cls, config, attention = T.Gemma2ForCausalLM, T.Gemma2Config(**common, sliding_window=16), "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation=attention).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_folders_compile_and_match_torch(family, tmp_path):
    """Gemma-2 goes through eager attention (no SDPA); both match torch at 1e-4 through
    the in-memory CompiledModel (the 0-d embed_scale weight also has to survive export,
    which the artifact writer handles)."""
    model = _save_tiny(family, tmp_path / family)
    notes: list[str] = []
    src = resolve(str(tmp_path / family), batch=1, seq=4, progress=notes.append)  # a batch-1 example
    assert ("eager attention" in src.description) == (family == "gemma2")
    assert any("no SDPA" in n for n in notes) == (family == "gemma2")
    compiled = llmc.compile(src.model, src.args, src.kwargs, dim_bounds={"batch": (1, 3), "seq": (1, 32)})
    x = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits.numpy()
    got = compiled(input_ids=x.numpy())[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4


def test_bundled_names_are_tiny_or_minilm():
    names = bundled_names()
    assert "minilm" in names and "tiny-gpt2" in names
    assert all(n == "minilm" or n.startswith("tiny-") for n in names)
    for name in ("gpt2", "llama", "tiny-minilm", "bert"):
        with pytest.raises(LLMCError, match="llmc never downloads"):
            resolve(name)


def test_error_messages_are_not_cut(tmp_path):
    """transformers' refusals carry URLs: the message is kept whole (first line)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": "many"}')
    with pytest.raises(LLMCError) as e:
        resolve(str(folder))
    assert "cannot load the Hugging Face model" in str(e.value) and str(e.value).count("(") == str(e.value).count(")")
