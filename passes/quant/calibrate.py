"""Calibration: token windows of the user's text, run through the graph, each target
matmul's inputs collected.

No per-model code: the graph being quantized is run by llmc's own reference interpreter
(compiler/interpreter.py) with its outputs replaced by the activations the targets read,
so whatever the frontend captured (torch or ONNX, any architecture) is calibrated the same
way. Per target it keeps H = X^T X (GPTQ), the mean |x| per input channel and a sample
of rows (AWQ's scale search), not the activations themselves.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ...compiler.interpreter import interpret
from ...compiler.ir import Graph, Node
from ...errors import LLMCError

MAX_SAMPLE_ROWS = 1024


def check_calibration_file(path: str | pathlib.Path | None, method: str) -> pathlib.Path | None:
    """The calibration text, checked before any work: gptq/awq need one, it must exist and hold text."""
    if path is None:
        if method in ("gptq", "awq", "smoothquant"):
            raise LLMCError(f"--method {method} needs calibration text: pass --calib FILE (a text file in the "
                            f"model's domain; {method} measures each layer's inputs on it)")
        return None
    p = pathlib.Path(path)
    if not p.is_file():
        raise LLMCError(f"calibration file {p} does not exist (or is not a file)")
    if p.stat().st_size == 0 or not p.read_text(encoding="utf-8", errors="replace").strip():
        raise LLMCError(f"calibration file {p} is empty")
    return p


def token_windows(path: pathlib.Path, tokenizer: str | pathlib.Path | None, samples: int, window: int) -> list[np.ndarray]:
    """Up to `samples` windows of `window` token ids (int64 [window]) spread evenly over the text."""
    if tokenizer is None:
        raise LLMCError("calibrating on text needs the model's tokenizer: compile a model folder holding "
                        "tokenizer.json, or pass tokenizer=PATH")
    from tokenizers import Tokenizer

    ids = np.asarray(Tokenizer.from_file(str(tokenizer)).encode(path.read_text(encoding="utf-8", errors="replace")).ids,
                     np.int64)
    if len(ids) < window:
        raise LLMCError(f"calibration file {path} has {len(ids)} tokens, fewer than one window of {window}")
    count = min(samples, len(ids) // window)
    starts = np.linspace(0, len(ids) - window, count).astype(np.int64)
    return [ids[s:s + window] for s in starts]


def graph_inputs_for(graph: Graph, ids: np.ndarray) -> list[np.ndarray]:
    """The graph's inputs for one window: token ids [1, T]; an attention mask of ones and
    token type ids of zeros where the graph takes them."""
    out = []
    for i, n in enumerate(graph.inputs):
        name = n.attrs.name.lower()
        if i == 0:
            out.append(ids[None, :].astype(n.dtype.numpy))
        elif "mask" in name:
            out.append(np.ones((1, len(ids)), n.dtype.numpy))
        elif "type" in name or "position" in name:
            base = np.arange(len(ids)) if "position" in name else np.zeros(len(ids))
            out.append(base[None, :].astype(n.dtype.numpy))
        else:
            raise LLMCError(f"calibration: cannot make a value for the graph input {n.attrs.name!r} "
                            f"(token ids, attention masks, token type and position ids are known)")
    return out


@dataclass
class Activations:
    """What calibration keeps of one matmul's inputs x [*, K]."""

    hessian: np.ndarray  # sum of x^T x over every calibration row, [K, K]
    abs_sum: np.ndarray  # sum of |x| per input channel, [K]
    abs_max: np.ndarray | None = None  # max |x| per input channel, [K] (SmoothQuant)
    rows: int = 0
    sample: list = field(default_factory=list)  # some rows, for searches that need x itself

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    def sample_rows(self) -> np.ndarray:
        return np.concatenate(self.sample, axis=0)


def collect(graph: Graph, targets: Sequence[Node], windows: Sequence[np.ndarray],
            progress: Callable[[str], None] | None = None) -> dict[int, Activations]:
    """target uid -> its input statistics over every window."""
    probe = Graph(graph.inputs, tuple(t.inputs[0] for t in targets), graph.params, graph.symbols)
    stats: dict[int, Activations] = {}
    per_window = max(1, MAX_SAMPLE_ROWS // max(len(windows), 1))
    rng = np.random.default_rng(0)
    for w, ids in enumerate(windows):
        if progress and (w % 8 == 0 or w == len(windows) - 1):
            progress(f"calibrating: window {w + 1}/{len(windows)} ({len(ids)} tokens)")
        values = interpret(probe, graph_inputs_for(graph, ids))
        for t, x in zip(targets, values):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            a = stats.get(t.uid)
            if a is None:
                a = stats[t.uid] = Activations(np.zeros((x.shape[1], x.shape[1])), np.zeros(x.shape[1]))
            a.hessian += x.T @ x
            a.abs_sum += np.abs(x).sum(axis=0)
            peak = np.abs(x).max(axis=0)
            a.abs_max = peak if a.abs_max is None else np.maximum(a.abs_max, peak)
            a.rows += x.shape[0]
            a.sample.append(x[rng.choice(x.shape[0], min(per_window, x.shape[0]), replace=False)])
    return stats


__all__ = ["check_calibration_file", "token_windows", "collect", "Activations", "graph_inputs_for"]
