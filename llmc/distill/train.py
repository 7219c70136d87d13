"""The training loop: AdamW, warmup then cosine or linear decay, held-out perplexity every
N steps, checkpoints every M steps, at the end and on Ctrl-C.

Progress through the schedule is the larger of steps done / --steps and training seconds /
--time-limit, so a time-limited run anneals its learning rate by the time it stops. The
clock counts training steps only (not evaluations or checkpoints), summed over resumes.
"""
from __future__ import annotations

import math
import pathlib
import sys
import time
from typing import Callable

import torch

from .checkpoint import State, save_state
from .config import DistillConfig
from .data import TokenData, WindowSampler
from .evaluate import perplexity
from .losses import hidden_mse, hidden_pairs, kd_ce_loss, next_token_loss


def lr_factor(c: DistillConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / c.warmup) if c.warmup else 1.0
    p = min(1.0, progress)
    decay = 0.5 * (1 + math.cos(math.pi * p)) if c.schedule == "cosine" else 1 - p
    return warm * (c.min_lr_ratio + (1 - c.min_lr_ratio) * decay)


def make_optimizer(student, c: DistillConfig) -> torch.optim.Optimizer:
    # no weight decay on norms' gains and biases (1-D tensors): decaying them toward 0 hurts
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95))


class Objective:
    """The loss of one batch for --loss kd or ce."""

    def __init__(self, c: DistillConfig, teacher, keep: tuple[int, ...]):
        self.c, self.teacher = c, teacher
        self.pairs = hidden_pairs(keep, teacher.config.num_hidden_layers)

    def __call__(self, student, batch: torch.Tensor) -> torch.Tensor:
        c = self.c
        x, y = batch[:, :-1], batch[:, 1:]
        hidden = c.loss == "kd" and c.hidden_weight > 0
        out = student(input_ids=x, use_cache=False, output_hidden_states=hidden)
        if c.loss == "ce":
            return next_token_loss(out.logits, y)
        with torch.no_grad():
            t = self.teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
        loss = kd_ce_loss(out.logits, t.logits, y, c.temperature, c.kd_weight, c.ce_weight)
        if hidden:
            loss = loss + c.hidden_weight * hidden_mse(out.hidden_states, t.hidden_states, self.pairs)
        return loss


def train(student, teacher, data: TokenData, c: DistillConfig, state: State, out: pathlib.Path,
          progress: Callable[[str], None], on_step: Callable[[int], None] | None = None) -> State:
    """Train from `state` (step 0 or a checkpoint) until --steps or --time-limit; returns the
    final state (also saved). `on_step(step)` runs after each completed step."""
    from tqdm import tqdm

    opt = make_optimizer(student, c)
    if state.optimizer:
        opt.load_state_dict(state.optimizer)
    sampler = WindowSampler(data.train, c.seq_len, c.batch, c.seed)
    if state.sampler:
        sampler.state = state.sampler
    torch.set_rng_state(state.torch_rng)
    objective = Objective(c, teacher, state.keep)
    eval_windows = data.heldout_windows(c.eval_windows)
    step, seconds = state.step, state.train_seconds

    def out_of_time() -> bool:
        return (c.time_limit is not None and seconds >= c.time_limit) or \
            (c.pause_at is not None and seconds >= c.pause_at)

    def snapshot(sampler_state: dict | None = None) -> State:
        state.step, state.train_seconds = step, seconds
        state.student, state.optimizer = student.state_dict(), opt.state_dict()
        state.sampler, state.torch_rng = sampler_state or sampler.state, torch.get_rng_state()
        return state

    def evaluate() -> None:
        ppl = perplexity(student, eval_windows, c.batch)
        state.evals.append((step, ppl))
        with tqdm.external_write_mode(file=sys.stderr):  # a line above the bar, not through it
            progress(f"step {step}: held-out perplexity {ppl:.3f} ({len(eval_windows)} windows)")

    student.train()
    bar = tqdm(total=c.steps, initial=step, desc=f"distill ({c.loss})", unit="step", dynamic_ncols=True,
               disable=None)
    before = None  # the sampler's state before the batch of a step in flight
    updating = False
    try:
        while step < c.steps and not out_of_time():
            before = sampler.state
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = c.lr * lr_factor(c, step, max(step / c.steps,
                                                            seconds / c.time_limit if c.time_limit else 0.0))
            batch = torch.from_numpy(sampler.next())
            loss = objective(student, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), c.grad_clip)
            updating = True  # an interrupt inside opt.step() leaves the weights half-updated
            opt.step()
            step += 1
            updating, before = False, None
            seconds += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            if step % c.eval_every == 0:
                evaluate()
            if step % c.checkpoint_every == 0:
                save_state(out, snapshot())
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        if not updating:  # otherwise the last periodic checkpoint stands
            save_state(out, snapshot(before))
            with tqdm.external_write_mode(file=sys.stderr):
                progress(f"interrupted: checkpoint at step {step} saved; --resume continues from it")
        raise
    finally:
        bar.close()
    if out_of_time() and step < c.steps:
        why = "paused" if c.time_limit is None or seconds < c.time_limit else f"time limit {c.time_limit:.0f}s reached"
        progress(f"{why} at step {step} of {c.steps} ({seconds:.0f}s of training)")
    if not state.evals or state.evals[-1][0] != step:
        evaluate()
    snap = snapshot()
    save_state(out, snap)
    return snap


def initial_state(keep, width, c: DistillConfig) -> State:
    torch.manual_seed(c.seed)
    return State(0, 0.0, {}, {}, {}, torch.get_rng_state(), keep, width, c.recorded())
