"""What `llmc compile SRC` accepts: an .onnx file, a local Hugging Face model folder,
`pkg.module:function` returning (model, example_args[, example_kwargs]), or the name
of a bundled example."""
from __future__ import annotations

import importlib
import json
import pathlib
from dataclasses import dataclass
from typing import Any

from .errors import LLMCError


@dataclass
class Source:
    model: Any  # torch.nn.Module or a .onnx path
    args: tuple = ()
    kwargs: dict | None = None
    description: str = ""


def _example_ids(vocab: int, batch: int, seq: int, with_mask: bool) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    kw: dict = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if with_mask:
        kw["attention_mask"] = torch.ones(batch, seq, dtype=torch.int64)
    return kw


def hf_folder(path: pathlib.Path, batch: int, seq: int) -> Source:
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    archs = cfg.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa").eval()
    except Exception as e:
        raise LLMCError(f"{path}: cannot load the Hugging Face model ({str(e).splitlines()[0][:200]})") from None
    kw = _example_ids(model.config.vocab_size, batch, seq, with_mask=not causal)
    if causal:
        kw["use_cache"] = False
    return Source(model, (), kw, f"{path} ({type(model).__name__})")


def resolve(src: str, batch: int = 2, seq: int = 16) -> Source:
    p = pathlib.Path(src)
    if src.endswith(".onnx"):
        if not p.is_file():
            raise LLMCError(f"{src}: no such ONNX file")
        return Source(str(p), description=f"ONNX file {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LLMCError(f"{src}: a model folder needs config.json and safetensors weights")
        return hf_folder(p, batch, seq)
    if ":" in src and not p.exists():
        mod_name, _, fn_name = src.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise LLMCError(f"cannot import {src!r}: {e}") from None
        out = fn()
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise LLMCError(f"{src} must return (model, example_args) or (model, example_args, example_kwargs)")
        return Source(out[0], tuple(out[1]), out[2] if len(out) == 3 else None, src)
    from .compiler.frontend.hf_models import TINY_MODELS, tiny_model

    name = src.removeprefix("tiny-")
    if name in TINY_MODELS:
        model, kwargs = tiny_model(name, batch=batch, seq=seq)
        return Source(model, (), kwargs, f"bundled example {src}")
    raise LLMCError(f"unknown source {src!r}: give an .onnx file, a Hugging Face model folder, "
                    f"pkg.module:function, or a bundled example: minilm, "
                    f"{', '.join('tiny-' + n for n in TINY_MODELS if n != 'minilm')}")
