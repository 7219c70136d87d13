"""The teacher: a local Hugging Face causal LM folder with its tokenizer. Its config.json is
checked (causal, layer count, tokenizer present) before anything heavy is loaded, so a wrong
folder fails in milliseconds."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from ..errors import LLMCError

# transformers' causal LM heads end in one of these (LlamaForCausalLM, GPT2LMHeadModel)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# what a tokenizer folder holds (the fast tokenizer's file, or a slow tokenizer's vocabulary)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TeacherInfo:
    folder: pathlib.Path
    config: dict
    num_layers: int


def inspect_teacher(folder: str) -> TeacherInfo:
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise LLMCError(f"teacher {folder}: no such folder (give a Hugging Face causal LM folder)")
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise LLMCError(f"teacher {folder}: no config.json (give a Hugging Face causal LM folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMCError(f"teacher {file}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise LLMCError(f"teacher {file}: expected a JSON object")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not any(str(a).endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise LLMCError(f"teacher {folder}: not a causal LM (architectures {archs}); distillation needs a "
                        f"next-token model such as LlamaForCausalLM, not an encoder like BERT")
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if not isinstance(layers, int) or layers < 1:
        raise LLMCError(f"teacher {file}: no layer count (num_hidden_layers)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise LLMCError(f"teacher {folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); the data file "
                        f"is tokenized with the teacher's tokenizer")
    return TeacherInfo(path, cfg, layers)


def check_layers(info: TeacherInfo, layers: int | None, keep: tuple[int, ...] | None) -> None:
    """--layers / --keep against the teacher's layer count."""
    n = info.num_layers
    if layers is not None and layers > n:
        raise LLMCError(f"--layers {layers}: the teacher has only {n} layers")
    if keep is not None:
        bad = [i for i in keep if i >= n]
        if bad:
            raise LLMCError(f"--keep {','.join(map(str, keep))}: layer {bad[0]} does not exist (the teacher has "
                            f"layers 0..{n - 1})")


def load_teacher(info: TeacherInfo):
    """(model in eval mode with frozen weights, tokenizer)."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    # what transformers raises for a folder it cannot load; the message names the cause
    load_errors = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError, SafetensorError,
                   StrictDataclassError)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(info.folder), local_files_only=True,
                                                                  attn_implementation="sdpa")
        tok = transformers.AutoTokenizer.from_pretrained(str(info.folder), local_files_only=True)
    except load_errors as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LLMCError(f"teacher {info.folder}: cannot load it: {type(e).__name__}: {first}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok
