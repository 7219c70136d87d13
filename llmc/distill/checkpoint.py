"""The student folder: a Hugging Face model folder (config.json, model.safetensors, the
teacher's tokenizer files) that `llmc compile` takes, plus distill.json (what was kept, the
options, the figures) and checkpoint/state.pt (weights, optimizer, step, RNG states) for
--resume. Every file is written to a temporary name and renamed, so an interrupt never
leaves a half-written one."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from dataclasses import dataclass, field

import torch

from ..errors import LLMCError
from .student import Width

RECORD = "distill.json"
CHECKPOINT = pathlib.Path("checkpoint") / "state.pt"
FORMAT = 1
PATHS = ("teacher", "data", "heldout")  # options naming files: compared as resolved paths
# a tokenizer's files in a Hugging Face folder (whichever the teacher has are copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def check_output(out: pathlib.Path, resume: bool) -> None:
    """Refuse, before any work, to write into a folder that holds anything but a run of ours,
    to restart a run without --resume, or to resume where there is nothing to resume."""
    if out.exists() and not out.is_dir():
        raise LLMCError(f"-o {out}: exists and is not a folder")
    ours = (out / RECORD).is_file()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise LLMCError(f"-o {out}: the folder holds other files (no {RECORD}); refusing to write the student "
                        f"into it. Give a new or empty folder")
    if resume and not (out / CHECKPOINT).is_file():
        raise LLMCError(f"--resume: {out} holds no checkpoint ({CHECKPOINT}) to resume from")
    if ours and not resume:
        raise LLMCError(f"-o {out}: already holds a distillation run; pass --resume to continue it, or give a new "
                        f"or empty folder")


@dataclass
class State:
    """Everything a resumed run needs to continue as if never stopped."""
    step: int
    train_seconds: float
    student: dict
    optimizer: dict
    sampler: dict
    torch_rng: torch.Tensor
    keep: tuple[int, ...]
    width: Width | None
    config: dict
    evals: list = field(default_factory=list)  # [(step, held-out perplexity)]


def _atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_state(out: pathlib.Path, s: State) -> None:
    (out / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "step": s.step, "train_seconds": s.train_seconds, "student": s.student,
            "optimizer": s.optimizer, "sampler": s.sampler, "torch_rng": s.torch_rng, "keep": list(s.keep),
            "width": None if s.width is None else [[list(c) for c in s.width.channels],
                                                   [list(g) for g in s.width.groups]],
            "config": s.config, "evals": [list(e) for e in s.evals]}
    _atomic(out / CHECKPOINT, lambda p: torch.save(blob, p))


def load_state(out: pathlib.Path) -> State:
    path = out / CHECKPOINT
    try:
        blob = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise LLMCError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise LLMCError(f"--resume: {path} is not a checkpoint of this llmc version")
    w = blob["width"]
    width = None if w is None else Width(tuple(map(tuple, w[0])), tuple(map(tuple, w[1])))
    return State(blob["step"], blob["train_seconds"], blob["student"], blob["optimizer"], blob["sampler"],
                 blob["torch_rng"], tuple(blob["keep"]), width, blob["config"], [tuple(e) for e in blob["evals"]])


def check_resume(recorded: dict, given: dict) -> None:
    """The options given to a --resume that shape the student or its training must be the
    checkpoint's; name the first one that is not."""
    for key, value in given.items():
        before = recorded.get(key)
        if isinstance(before, list):
            before = tuple(before)
        if key in PATHS and value is not None and before is not None:
            value, before = pathlib.Path(value).resolve(), pathlib.Path(before).resolve()
        if key in recorded and before != value:
            flag = "--" + key.replace("_", "-")
            raise LLMCError(f"--resume: {flag} {value} differs from the checkpoint's {before}; a resumed run keeps "
                            f"its options (only --steps, --time-limit, --eval-every, --checkpoint-every may change)")


def write_record(out: pathlib.Path, record: dict) -> None:
    _atomic(out / RECORD, lambda p: p.write_text(json.dumps(record, indent=1)))


def read_record(out: pathlib.Path) -> dict:
    return json.loads((out / RECORD).read_text())


def write_model(out: pathlib.Path, student, teacher_folder: pathlib.Path) -> None:
    """config.json + model.safetensors (+ generation_config.json) and the teacher's tokenizer."""
    tmp = out / f".write-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (teacher_folder / name).is_file():
            shutil.copyfile(teacher_folder / name, tmp / name)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
