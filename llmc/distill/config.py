"""The one set of options a distillation run takes (the CLI and the Python API both build a
DistillConfig), with their defaults and the checks that need no model or data."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import LLMCError

LOSSES = ("kd", "ce")
IMPORTANCE = ("loss", "cosine")
SCHEDULES = ("cosine", "linear")
TEACHER_DTYPES = ("float32", "bfloat16")

# Options that only steer how far and how visibly a run goes: a --resume may change them.
# Every other option shapes the student or its training and must match the checkpoint's.
RUN_CONTROL = frozenset({"steps", "time_limit", "eval_every", "checkpoint_every", "resume", "pause_at"})


@dataclass(frozen=True)
class DistillConfig:
    teacher: str
    output: str
    data: str
    heldout: str | None = None  # None: the last `heldout_fraction` of --data's tokens
    heldout_fraction: float = 0.1
    # the student's shape: kept teacher layers (given, or the `layers` most important ones;
    # neither: half the teacher's layers) and the fraction of MLP channels / KV head groups kept
    layers: int | None = None
    keep: tuple[int, ...] | None = None
    width_ratio: float = 1.0
    importance: str = "loss"
    calib_windows: int = 16  # windows of --data scored for layer importance and width pruning
    # the loss: kd = temperature-scaled KL on logits + hidden-state MSE (+ optional next-token CE);
    # ce = the plain next-token loss (the baseline distillation is compared with)
    loss: str = "kd"
    temperature: float = 1.0
    kd_weight: float = 1.0
    hidden_weight: float = 1.0
    ce_weight: float = 1.0
    # the teacher's forward pass during training: "bfloat16" runs a bf16 copy (the student and the
    # layer choice stay float32): on CPUs with bf16 matrix units (AMX, AVX512-BF16) about 3.5x
    # faster, and a kd step is the student's step plus the teacher's forward
    teacher_dtype: str = "float32"
    # optimisation
    steps: int = 1000
    seq_len: int = 128
    batch: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    time_limit: float | None = None  # seconds of training (evaluations not counted), over all resumes
    eval_every: int = 100
    eval_windows: int = 64  # held-out windows scored every eval_every steps (the final score uses all)
    checkpoint_every: int = 100
    resume: bool = False
    # Python API only: end this invocation once training time reaches pause_at seconds (checkpoint
    # and model written, as at the end), while the schedule still runs to time_limit; a later
    # resume continues. benchmarks/distill_cpu.py takes turns between two runs this way.
    pause_at: float | None = None

    def recorded(self) -> dict:
        """What a checkpoint records to check a --resume against."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_CONTROL}


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise LLMCError(f"--{name.replace('_', '-')} {value}: must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise LLMCError(f"--{name.replace('_', '-')} {value}: must be {'>= 0' if allow_zero else '> 0'}")


def validate(c: DistillConfig) -> None:
    """Checks on the options alone (those that need the teacher are in teacher.py)."""
    if c.layers is not None and c.keep is not None:
        raise LLMCError("give either --layers N or --keep I,J,... (the layers to keep), not both")
    if c.layers is not None:
        _positive("layers", c.layers)
    if c.keep is not None:
        if not c.keep:
            raise LLMCError("--keep: name at least one layer (e.g. --keep 0,2)")
        dup = sorted({i for i in c.keep if c.keep.count(i) > 1})
        if dup:
            raise LLMCError(f"--keep {','.join(map(str, c.keep))}: layer {dup[0]} is named twice")
        if min(c.keep) < 0:
            raise LLMCError(f"--keep {','.join(map(str, c.keep))}: layer indices start at 0")
        if list(c.keep) != sorted(c.keep):
            raise LLMCError(f"--keep {','.join(map(str, c.keep))}: list the layers in increasing order")
    if not 0 < c.width_ratio <= 1 or not math.isfinite(c.width_ratio):
        raise LLMCError(f"--width-ratio {c.width_ratio}: must be in (0, 1] (the fraction of MLP channels and "
                        f"attention heads kept)")
    if not 0 < c.heldout_fraction < 1:
        raise LLMCError(f"heldout_fraction {c.heldout_fraction}: must be in (0, 1)")
    for name, allowed in (("loss", LOSSES), ("importance", IMPORTANCE), ("schedule", SCHEDULES),
                          ("teacher_dtype", TEACHER_DTYPES)):
        if getattr(c, name) not in allowed:
            raise LLMCError(f"--{name.replace('_', '-')} {getattr(c, name)!r}: expected one of {', '.join(allowed)}")
    _positive("steps", c.steps, allow_zero=True)  # 0: write the pruned student untrained
    for name in ("seq_len", "batch", "lr", "eval_every", "eval_windows", "checkpoint_every", "temperature",
                 "calib_windows"):
        _positive(name, getattr(c, name))
    for name in ("kd_weight", "hidden_weight", "ce_weight", "warmup", "weight_decay", "grad_clip"):
        _positive(name, getattr(c, name), allow_zero=True)
    if not 0 <= c.min_lr_ratio <= 1:
        raise LLMCError(f"--min-lr-ratio {c.min_lr_ratio}: must be in [0, 1]")
    if c.time_limit is not None:
        _positive("time_limit", c.time_limit)
    if c.loss == "kd" and c.kd_weight + c.hidden_weight + c.ce_weight == 0:
        raise LLMCError("--loss kd with every loss weight 0: nothing to train on")
