"""The token cost of an OpenAI request before it is sent to a replica (for the router):
its prompt tokens and the most tokens it may generate, over all its choices.

The front reads the same tokenizer and chat template as the replicas (from the artifact
folder: no weights are loaded), and parses the body with the same request models, so a
request costs what the replica will see. A body the models refuse costs nothing here: it
still goes to a replica, whose 400 says what is wrong.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from pydantic import ValidationError

from ...errors import LLMCError
from .chat import ChatTemplate, find_template
from .openai_api import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Cost:
    prompt_tokens: int
    max_tokens: int


FREE = Cost(0, 0)


class RequestCost:
    def __init__(self, tokenizer, chat: ChatTemplate, max_context: int):
        self.tokenizer, self.chat, self.max_context = tokenizer, chat, max_context

    @classmethod
    def from_artifact(cls, artifact: str | pathlib.Path, chat_template: str | None = None) -> "RequestCost":
        from ..artifact_files import read_manifest
        from ..engine.llm import _load_tokenizer

        path = pathlib.Path(artifact)
        gen = read_manifest(path).generation
        if gen is None:
            raise LLMCError(f"{artifact} has no step function (not a causal LM, or compiled with --no-generate)")
        tok = _load_tokenizer(path / gen.tokenizer) if gen.tokenizer is not None else None
        eos = tok.decode([gen.stop_token_ids[0]], skip_special_tokens=False) \
            if tok is not None and gen.stop_token_ids else ""
        source, _ = find_template(path, chat_template)
        return cls(tok, ChatTemplate(source, eos_token=eos), gen.max_context)

    def _count(self, prompt) -> int:
        if isinstance(prompt, str):
            return len(self.tokenizer.encode(prompt).ids) if self.tokenizer is not None else 0
        return len(prompt)

    def _room(self, asked: int | None, longest: int) -> int:
        return max(0, self.max_context - longest) if asked is None else max(0, asked)

    def of(self, path: str, body: bytes) -> Cost:
        try:
            data = json.loads(body)
            if path.endswith("/chat/completions"):
                r = ChatRequest.model_validate(data)
                if self.tokenizer is None:
                    return FREE
                text = self.chat.render([{"role": m.role, "content": m.text()} for m in r.messages])
                prompt = self._count(text)
                asked = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
                return Cost(prompt, self._room(asked, prompt) * max(1, r.n))
            if path.endswith("/completions"):
                r = CompletionRequest.model_validate(data)
                counts = [self._count(p) for p in r.prompts()]
                return Cost(sum(counts), self._room(r.max_tokens, max(counts)) * len(counts) * max(1, r.n))
        except (ValueError, ValidationError, LLMCError):  # bad JSON, a bad body, a template that refuses
            return FREE
        return FREE


__all__ = ["RequestCost", "Cost", "FREE"]
