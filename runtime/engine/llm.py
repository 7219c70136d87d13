"""`LLM`: what `llmc.load` returns for a generation artifact (and what `llmc.compile` of a
causal LM carries): the forward entry point, callable as before, and `generate()`.

    llm = llmc.load("tiny.llmc")
    out = llm.generate(["def main(", "import os"], max_new_tokens=32)
    out[0].token_ids, out[0].text

The KV page pool is made on the first generate() from `kv_memory` (bytes; default: 512 MiB
on the host, half the free memory on a GPU, trimmed to what max_seqs sequences of the full
context can use). The step runs where `step` (runtime/engine/step_runner.py) puts it.
"""
from __future__ import annotations

import pathlib
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from ...errors import InputError, LLMCError
from ..manifest import GenerationSpec
from .generate import Generation, StepLimits, TokenLoop
from .kv_cache import KvLayout, PagePool
from .pp_step import PipelineStep
from .sampler import SamplingParams
from .step_runner import DEFAULT_KV_MEMORY, CpuStep, GpuStep


def _load_tokenizer(file: pathlib.Path | None):
    if file is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers comes with transformers
        raise LLMCError("this artifact carries a tokenizer; reading it needs the `tokenizers` package") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises its own Exception type for a bad file
        raise LLMCError(f"{file}: cannot read the tokenizer ({str(e)[:200]})") from None


class LLM:
    """A causal LM's forward (`llm(ids)`, logits for every position) and `generate()`."""

    def __init__(self, forward, step, spec: GenerationSpec, tokenizer_file: pathlib.Path | None = None,
                 kv_memory: int | None = None):
        """`step`: the step function's Executor (CPU) or GpuExecutor, or a runner wrapping one."""
        self.forward, self.spec = forward, spec
        if isinstance(step, (CpuStep, GpuStep)):
            self.step = step
        elif getattr(step, "device", "cpu") == "cuda":
            self.step = GpuStep(step, spec.max_context, spec.page_size, spec.max_seqs)
        else:
            self.step = CpuStep(step)
        self.tokenizer = _load_tokenizer(tokenizer_file)
        self.layout = KvLayout(spec.page_size, tuple((l.kv_heads, l.head_dim) for l in spec.layers), spec.kv_dtype)
        self.limits = StepLimits(spec.max_tokens, spec.max_seqs, spec.max_context, spec.vocab)
        self.kv_memory = kv_memory
        self._pool: PagePool | None = None
        self._lock = threading.Lock()  # one generate() at a time owns the pool
        self._pool_made = threading.Lock()
        self.last_stats = None

    # the forward entry point, as a plain Executor is called
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @property
    def input_names(self):
        return self.forward.input_names

    @property
    def output_names(self):
        return self.forward.output_names

    def describe(self) -> dict:
        d = self.forward.describe()
        s = self.spec
        d["generation"] = {"page_size": s.page_size, "layers": len(s.layers), "max_context": s.max_context,
                           "max_tokens": s.max_tokens, "max_seqs": s.max_seqs, "vocab": s.vocab}
        return d

    @property
    def pool(self) -> PagePool:
        with self._pool_made:  # generate() reads it outside the run lock: make it once
            if self._pool is None:
                self._pool = self._make_pool()
        return self._pool

    def _make_pool(self) -> PagePool:
        useful = self.layout.page_bytes * self.limits.max_seqs * -(-self.limits.max_context // self.layout.page_size)
        budget = min(self.step.default_kv_memory(), useful) if self.kv_memory is None else int(self.kv_memory)
        pool = self.step.make_pool(self.layout, budget)
        self.step.bind_pool(pool)
        return pool

    def step_logits(self, inputs: dict) -> np.ndarray:
        """One call of the step function: inputs by name (TokenLoop._inputs) -> logits [rows, vocab]."""
        return self.step(inputs)

    def step_greedy(self, inputs: dict) -> np.ndarray:
        """One call of the step function -> each logits row's argmax [rows] (on the GPU there)."""
        return self.step.greedy(inputs)

    def encode(self, prompt: Any, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(f"prompt {i} is text, but this artifact has no tokenizer: pass token ids")
            return list(self.tokenizer.encode(prompt).ids)
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
                raise InputError(f"prompt {i}: expected a 1-D integer array of token ids, got {prompt.dtype}"
                                 f"{list(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise InputError(f"prompt {i}: expected a string or a list of token ids, got {type(prompt).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in prompt):
            raise InputError(f"prompt {i}: token ids must be ints")
        return [int(t) for t in prompt]

    def _prompts(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(t, (int, np.integer)) for t in prompts)):
            prompts = [prompts]
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("generate() takes a prompt (text or token ids) or a non-empty list of them")
        return [self.encode(p, i) for i, p in enumerate(prompts)]

    def generate(self, prompts: Any, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, stream: bool = False):
        """New tokens for each prompt (a list of Generation), or with stream=True an iterator
        of (prompt index, token id) as they come. Prompts are strings (with a tokenizer) or
        lists of token ids, of any lengths. stop_token_ids=None stops at the model's
        end-of-sequence ids; () never stops early. temperature 0 is greedy."""
        ids = self._prompts(prompts)
        try:
            stops = tuple(self.spec.stop_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
            params = [SamplingParams(max_new_tokens, float(temperature), top_k, float(top_p),
                                     float(repetition_penalty), None if seed is None else int(seed) + i, stops)
                      for i in range(len(ids))]
        except (TypeError, ValueError) as e:  # e.g. temperature="hot", seed=[1]
            raise InputError(f"generate(): bad sampling argument ({e})") from None
        # built now, so bad prompts are refused here, not at the first token of a stream; it
        # takes no pages until it runs (under the lock)
        loop = self._pipelined_loop(ids, params) or TokenLoop(self.step_logits, self.pool, self.limits, ids, params,
                                                              greedy=self.step_greedy)
        if stream:
            return self._stream(loop)
        with self._lock:
            try:
                for _ in loop.run():
                    pass
            finally:
                self._release(loop)
            return [Generation(s.new_tokens, s.finish, self.decode(s.new_tokens))
                    for s in (loop.finished[i] for i in range(len(ids)))]

    def _pipelined_loop(self, ids, params) -> TokenLoop | None:
        """A pipeline stage's loop with micro-batches in flight (pp_step.PipelineStep), else None."""
        return self.step.token_loop(self.pool, self.limits, ids, params) if isinstance(self.step, PipelineStep) else None

    def _stream(self, loop: TokenLoop) -> Iterator[tuple[int, int]]:
        with self._lock:
            try:
                yield from loop.run()
            finally:
                self._release(loop)

    def _release(self, loop: TokenLoop) -> None:
        for s in list(loop.running):  # stopped early (an error, a consumer that left): pages go back
            s.kv.release()
        self.last_stats = loop.stats
        self.step.done()

    def decode(self, token_ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(token_ids))


__all__ = ["LLM", "DEFAULT_KV_MEMORY"]
