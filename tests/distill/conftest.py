"""Tiny teachers for the distillation tests: random-weight 4-layer Llamas (transformers'
LlamaConfig) saved as Hugging Face folders with a small byte-level BPE tokenizer trained on
stdlib text, and that text as the data file."""
from __future__ import annotations

import json
import pathlib
import textwrap

import pytest
import torch
import transformers

LAYERS = 4


def corpus() -> str:
    """About 100 KB of real Python source (the stdlib is on every machine)."""
    import argparse
    import dataclasses
    import json as json_mod

    files = [pathlib.Path(m.__file__) for m in (textwrap, json_mod.decoder, json_mod.encoder, dataclasses, argparse)]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def make_tokenizer(text: str, vocab: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>",
                                                pad_token="<eos>")


def make_teacher(folder: pathlib.Path, tokenizer, seed: int = 0, **overrides) -> pathlib.Path:
    kw = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, head_dim=8,
              bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2)
    kw.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(text_file):
    return make_tokenizer(text_file.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> pathlib.Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "llama", tokenizer)


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True,
                                                             attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tokenizer) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("bert") / "bert"
    cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    return folder
