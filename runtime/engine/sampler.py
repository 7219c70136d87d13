"""Choosing the next token from a row of logits: greedy, or temperature / top-k / top-p
sampling with a repetition penalty, in the order transformers applies them (penalty,
temperature, top-k, top-p). Each request has its own seeded generator, so a seed
reproduces its tokens whatever else shares the batch.

The serving engine's requests add stop strings, log-probabilities and n samples per prompt
(the fields after stop_token_ids); `generate()` leaves them at their defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import InputError

MAX_LOGPROBS = 20  # as OpenAI's API allows
MAX_N = 16


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)  # text that ends a sequence (not included in it)
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    n: int = 1  # sequences sampled per prompt (seeds seed, seed + 1, ...)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(t, str) or not t for t in self.stop):
            raise InputError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise InputError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    v = out[ids]
    out[ids] = np.where(v < 0, v * penalty, v / penalty)
    return out


def argmax_only(params: SamplingParams) -> bool:
    """Whether a row's argmax is all this request needs of its logits (greedy, no penalty, no
    logprobs): a GPU step then computes it on the device (GpuStep.greedy)."""
    return params.temperature == 0 and params.repetition_penalty == 1.0 and params.logprobs is None


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray) -> int:
    """One token id from a [vocab] row of logits."""
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        return int(np.argmax(logits))  # widening to float64 keeps the order: skip the copy
    x = penalize(logits.astype(np.float64), seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(x))  # the first of equal maxima, as torch.argmax
    x = x / params.temperature
    if params.top_k and params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        drop = cum - p[order] >= params.top_p  # keep the smallest prefix reaching top_p (at least one)
        p[order[drop]] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of a [vocab] row of the model's logits (before any sampling transform, as
    OpenAI's and vLLM's logprobs report them)."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def top_logprobs(logp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log-probability), most likely first (ties: lower id first)."""
    if k == 0:
        return []
    idx = np.argpartition(-logp, k - 1)[:k] if k < logp.size else np.arange(logp.size)
    idx = sorted(idx.tolist(), key=lambda i: (-logp[i], i))
    return [(int(i), float(logp[i])) for i in idx]


__all__ = ["SamplingParams", "sample", "penalize", "log_softmax", "top_logprobs", "MAX_LOGPROBS", "MAX_N"]
