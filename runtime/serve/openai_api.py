"""OpenAI's request and response shapes (completions, chat completions) and their mapping
onto the engine's SamplingParams and Events. pydantic comes with FastAPI (the `serve` extra)."""
from __future__ import annotations

import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ...errors import InputError
from ..engine.sampler import MAX_LOGPROBS, SamplingParams
from .sequence import Event


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use (user, ...) are not an error

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension; -1 means off as there
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM): generate max_tokens tokens whatever comes
    return_token_ids: bool = False  # extension (vLLM): each choice also carries its token ids
    seed: int | None = None
    repetition_penalty: float = 1.0  # extension (vLLM)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def sampling(self, max_tokens: int, logprobs: int | None, model_stops: tuple[int, ...]) -> SamplingParams:
        if self.presence_penalty or self.frequency_penalty:
            raise InputError("presence_penalty and frequency_penalty are not supported (use repetition_penalty)")
        stops = tuple(() if self.ignore_eos else model_stops) + tuple(self.stop_token_ids or ())
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens, self.temperature, 0 if self.top_k == -1 else self.top_k, self.top_p,
                              self.repetition_penalty, self.seed, stops, stop, logprobs, self.n)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            raise InputError("prompt is empty")
        return list(p)

    def unsupported(self) -> None:
        if self.echo:
            raise InputError("echo is not supported")
        if self.suffix:
            raise InputError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise InputError("best_of other than n is not supported")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InputError(f"logprobs must be in [0, {MAX_LOGPROBS}]")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"message content parts must be text, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


# --- responses


def now() -> int:
    return int(time.time())


def token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok]) if tokenizer is not None else f"token_id:{tok}"


def completion_logprobs(tokenizer, events: list[Event], offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ev in events:
        t = token_text(tokenizer, ev.token_id)
        out["tokens"].append(t)
        out["token_logprobs"].append(ev.logprob)
        out["top_logprobs"].append({token_text(tokenizer, i): lp for i, lp in ev.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(t)
    return out


def chat_logprobs(tokenizer, events: list[Event]) -> dict:
    def entry(tok: int, lp: float) -> dict:
        t = token_text(tokenizer, tok)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    return {"content": [dict(entry(ev.token_id, ev.logprob),
                             top_logprobs=[entry(i, lp) for i, lp in ev.top_logprobs]) for ev in events]}


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind, code = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                  404: ("invalid_request_error", "model_not_found"), 429: ("rate_limit_error", "queue_full"),
                  503: ("service_unavailable", "shutting_down")}.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "completion_logprobs", "chat_logprobs", "usage",
           "error_body", "token_text", "now"]
