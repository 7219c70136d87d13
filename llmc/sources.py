"""What `llmc compile SRC` accepts: an .onnx file, a local Hugging Face model folder,
`pkg.module:function` returning (model, example_args[, example_kwargs]), or the name
of a bundled example (`minilm`, `tiny-gpt2`, `tiny-llama`, ...).

llmc never downloads anything: a Hugging Face Hub id (`gpt2`, `meta-llama/Llama-3.2-1B`)
gives an error saying how to download the folder and pass its path. The bundled tiny
models are random 2-layer models for tests and demos, so they only answer to `tiny-*`
names: `llmc compile gpt2` must never quietly compile a toy that looks like GPT-2.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .errors import LLMCError


@dataclass
class Source:
    model: Any  # torch.nn.Module or a .onnx path
    args: tuple = ()
    kwargs: dict | None = None
    description: str = ""
    tokenizer: str | None = None  # a tokenizer.json beside the model (Hugging Face folders)


def bundled_names() -> list[str]:
    """The names `llmc compile` accepts for bundled examples."""
    from .compiler.frontend.hf_models import TINY_MODELS

    return ["minilm"] + [f"tiny-{n}" for n in TINY_MODELS if n != "minilm"]


def _example_ids(vocab: int, batch: int, seq: int, with_mask: bool) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    kw: dict = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if with_mask:
        kw["attention_mask"] = torch.ones(batch, seq, dtype=torch.int64)
    return kw


def _read_config(path: pathlib.Path) -> dict:
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LLMCError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LLMCError(f"{file}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise LLMCError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _no_sdpa(error: Exception) -> bool:
    """Is this transformers' "this model has no SDPA attention" refusal?"""
    text = str(error).lower()
    return "sdpa" in text or "scaled_dot_product_attention" in text


def _first_line(error: Exception) -> str:
    """The first line of an error message, whole (never cut inside a URL)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def hf_folder(path: pathlib.Path, batch: int, seq: int, progress: Callable[[str], None] | None = None) -> Source:
    import transformers

    cfg = _read_config(path)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise LLMCError(f"{path / 'config.json'}: 'architectures' must be a list, got {archs!r}")
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    # transformers raises all of these for a folder it cannot load (bad config values,
    # unknown model types, missing or corrupt weights); the message names the cause.
    from huggingface_hub.errors import StrictDataclassError  # transformers 5's config validation
    from safetensors import SafetensorError

    load_errors = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError, SafetensorError,
                   StrictDataclassError)
    attention = "sdpa"
    try:
        try:
            model = cls.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
        except ValueError as e:
            if not _no_sdpa(e):
                raise
            # Gemma-2 and others have no SDPA path; their eager attention captures fine.
            attention = "eager"
            if progress:
                progress(f"{path.name}: no SDPA attention in this model, using its eager attention")
            model = cls.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    except load_errors as e:
        raise LLMCError(f"{path}: cannot load the Hugging Face model: {type(e).__name__}: {_first_line(e)}") from None
    model.eval()
    kw = _example_ids(model.config.vocab_size, batch, seq, with_mask=not causal)
    if causal:
        kw["use_cache"] = False
    tok = path / "tokenizer.json"
    return Source(model, (), kw, f"{path} ({type(model).__name__}, {attention} attention)",
                  str(tok) if causal and tok.is_file() else None)


def _where(error: BaseException) -> str:
    """'file.py:12' of the innermost frame of an exception's traceback."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""


def module_function(src: str) -> Source:
    """`pkg.module:function` -> the function's (model, example_args[, example_kwargs]).
    Modules are looked up in the current folder first, as `python -m` would."""
    mod_name, _, fn_name = src.partition(":")
    if not mod_name or not fn_name:
        raise LLMCError(f"{src!r}: write a module function source as pkg.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    # The user's module and function run here: whatever they raise is reported, with the
    # place it was raised, as the cause of a clean error (not as an llmc traceback).
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise LLMCError(f"cannot import {src!r}: {e} (looked in the current folder and sys.path)") from None
    except Exception as e:  # noqa: BLE001 - user code; reported with its cause and location
        raise LLMCError(f"importing {mod_name!r} for {src!r} raised {type(e).__name__}: {e}{_where(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LLMCError(f"{src!r}: module {mod_name!r} has no function {fn_name!r}")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - user code; reported with its cause and location
        raise LLMCError(f"{src}() raised {type(e).__name__}: {e}{_where(e)}") from None
    if not isinstance(out, tuple) or len(out) not in (2, 3) or not isinstance(out[1], (tuple, list)):
        raise LLMCError(f"{src} must return (model, example_args) or (model, example_args, example_kwargs), "
                        f"with example_args a tuple")
    return Source(out[0], tuple(out[1]), out[2] if len(out) == 3 else None, src)


# What a Hugging Face Hub id looks like: `name` or `org/name` (no leading ./ or /).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _unknown(src: str) -> LLMCError:
    from .compiler.frontend.hf_models import TINY_MODELS

    bundled = ", ".join(bundled_names())
    hint = ""
    if src in TINY_MODELS and src != "minilm":
        hint = (f" (the bundled tiny-{src} is a random 2-layer {src} for tests, not the real model; "
                f"name it tiny-{src} if that is what you want)")
    if _HUB_ID.fullmatch(src) and not src.endswith(".onnx"):
        return LLMCError(
            f"unknown source {src!r}: no such file or folder here{hint}. llmc never downloads models: if this is "
            f"a Hugging Face Hub id, download the folder first (huggingface-cli download {src} --local-dir DIR) "
            f"and pass DIR. Other sources: a .onnx file, pkg.module:function, or a bundled example: {bundled}")
    return LLMCError(f"unknown source {src!r}: no such file or folder. Give a .onnx file, a Hugging Face model "
                     f"folder, pkg.module:function, or a bundled example: {bundled}")


def resolve(src: str, batch: int = 2, seq: int = 16, progress: Callable[[str], None] | None = None) -> Source:
    p = pathlib.Path(src)
    if src.endswith(".onnx"):
        if not p.is_file():
            raise LLMCError(f"{src}: no such ONNX file")
        return Source(str(p), description=f"ONNX file {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LLMCError(f"{src}: a model folder needs config.json and safetensors weights")
        return hf_folder(p, batch, seq, progress)
    if ":" in src and not p.exists():
        return module_function(src)
    if src in bundled_names():
        from .compiler.frontend.hf_models import tiny_model

        model, kwargs = tiny_model(src.removeprefix("tiny-"), batch=batch, seq=seq)
        kind = "the real all-MiniLM-L6-v2" if src == "minilm" else "a random 2-layer model"
        return Source(model, (), kwargs, f"bundled example {src} ({kind})")
    raise _unknown(src)
