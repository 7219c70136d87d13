"""One distillation run, start to finish: every check that can fail runs before the teacher is
loaded or a step is trained; then layers and widths are chosen, the student is built, trained
and written."""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import checkpoint as ckpt
from .config import DistillConfig, validate
from .data import calibration_windows, load_data, read_text
from .evaluate import perplexity
from .select import choose_layers, choose_width, layer_importance, unit_scores
from .student import build_student, check_prunable
from .teacher import check_layers, inspect_teacher, load_teacher
from .train import initial_state, train


def _progress(msg: str) -> None:
    print(f"[llmc] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Result:
    output: pathlib.Path
    keep: tuple[int, ...]
    start_step: int  # 0, or the checkpoint's step on --resume
    steps: int  # steps done in total
    train_seconds: float
    evals: list  # [(step, held-out perplexity on the eval windows)]


def distill(c: DistillConfig, progress: Callable[[str], None] = _progress,
            on_step: Callable[[int], None] | None = None, given: dict | None = None) -> Result:
    """`given`: the options the user named (a --resume checks them against its checkpoint);
    None means all of c's fields."""
    out = pathlib.Path(c.output)
    validate(c)
    info = inspect_teacher(c.teacher)
    check_layers(info, c.layers, c.keep)
    read_text(c.data, "--data")  # missing / empty / not text: fail now, not after loading the teacher
    if c.heldout is not None:
        read_text(c.heldout, "--heldout")
    ckpt.check_output(out, c.resume)
    saved = ckpt.load_state(out) if c.resume else None
    if saved is not None:
        ckpt.check_resume(saved.config, dataclasses.asdict(c) if given is None else given)
        # the run's own options, with this invocation's run control (steps, time limit, ...)
        c = dataclasses.replace(c, **{k: v for k, v in saved.config.items() if k != "keep"},
                                keep=None if saved.config["keep"] is None else tuple(saved.config["keep"]))
    t0 = time.perf_counter()
    progress(f"loading teacher {info.folder} ({info.num_layers} layers)")
    teacher, tokenizer = load_teacher(info)
    if c.width_ratio < 1:
        check_prunable(teacher)
    data = load_data(tokenizer, c.data, c.heldout, c.seq_len, c.heldout_fraction)
    progress(f"{data.train.size} training tokens, {data.heldout.size} held-out tokens "
             f"({time.perf_counter() - t0:.1f}s)")
    if saved is not None:
        keep, width, state = saved.keep, saved.width, saved
        progress(f"resuming at step {state.step} of {c.steps} (kept layers {list(keep)})")
    else:
        keep, width = _choose(teacher, c, info.num_layers, data.train, progress)
        out.mkdir(parents=True, exist_ok=True)
        state = initial_state(keep, width, c)
        ckpt.write_record(out, _record(c, keep, width, info, None))
    student = build_student(teacher, keep, width)
    if state.student:
        student.load_state_dict(state.student)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    progress(f"student: {len(keep)} of {info.num_layers} layers, {n_s / 1e6:.2f}M parameters "
             f"({n_s / n_t:.0%} of the teacher's {n_t / 1e6:.2f}M)")
    if saved is None:
        ckpt.save_state(out, _with_weights(state, student))  # step 0: a run stopped at once still resumes
    start = state.step
    if c.steps > 0 or saved is not None:
        state = train(student, _for_training(teacher, c), data, c, state, out, progress, on_step)
    else:  # --steps 0: the pruned student as it is
        ppl = perplexity(student, data.heldout_windows(c.eval_windows), c.batch)
        state.evals.append((0, ppl))
        progress(f"untrained student: held-out perplexity {ppl:.3f}")
    ckpt.write_model(out, student, info.folder)
    ckpt.write_record(out, _record(c, keep, width, info, state))
    progress(f"wrote {out} (step {state.step}, {state.train_seconds:.0f}s of training)")
    return Result(out, keep, start, state.step, state.train_seconds, list(state.evals))


def _for_training(teacher, c: DistillConfig):
    """The teacher the training loop runs: a bf16 copy for --teacher-dtype bfloat16 (a copy: the
    student was built from the teacher's float32 tensors and must keep them)."""
    if c.teacher_dtype == "float32" or c.loss == "ce":
        return teacher
    import copy

    return copy.deepcopy(teacher).to(torch.bfloat16)


def _choose(teacher, c: DistillConfig, n_layers: int, train_ids, progress):
    need_calib = c.keep is None or c.width_ratio < 1
    calib = torch.from_numpy(calibration_windows(train_ids, c.seq_len, c.calib_windows, c.seed)) if need_calib \
        else None
    if c.keep is not None:
        keep = tuple(c.keep)
    else:
        n = c.layers if c.layers is not None else max(1, n_layers // 2)
        scores = layer_importance(teacher, calib, c.importance)
        keep = choose_layers(scores, n)
        progress(f"layer importance ({c.importance}): " + ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(scores))
                 + f"; keeping {list(keep)}")
    width = None
    if c.width_ratio < 1:
        width = choose_width(unit_scores(teacher, keep, calib), c.width_ratio)
        progress(f"width pruning: {len(width.channels[0])} MLP channels, {len(width.groups[0])} KV head groups "
                 f"per layer")
    return keep, width


def _with_weights(state, student):
    state.student = student.state_dict()
    return state


def _record(c: DistillConfig, keep, width, info, state) -> dict:
    return {"teacher": str(info.folder), "teacher_layers": info.num_layers, "kept_layers": list(keep),
            "width": None if width is None else {"mlp_channels": len(width.channels[0]),
                                                 "kv_head_groups": len(width.groups[0])},
            "options": c.recorded(), "step": 0 if state is None else state.step,
            "train_seconds": 0.0 if state is None else round(state.train_seconds, 1),
            "heldout_perplexity": [list(e) for e in state.evals] if state else []}
