"""Chat messages to a prompt: the model's own chat template (Jinja, as Hugging Face
tokenizer folders carry it) rendered in a sandbox, or a plain default."""
from __future__ import annotations

import json
import pathlib
from typing import Any

from ...errors import InputError, LLMCError

# Roles in tags the tokenizer has no special tokens for: still an unambiguous layout for a
# model fine-tuned on nothing in particular.
DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def find_template(artifact: pathlib.Path, override: str | None = None) -> tuple[str, str]:
    """(template, where it came from): --chat-template FILE, else the artifact folder's
    chat_template.jinja or tokenizer_config.json "chat_template", else the default."""
    if override is not None:
        p = pathlib.Path(override)
        if not p.is_file():
            raise LLMCError(f"--chat-template {override}: no such file")
        return p.read_text(), str(p)
    jinja = artifact / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), str(jinja)
    cfg = artifact / "tokenizer_config.json"
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise LLMCError(f"{cfg}: not JSON ({e})") from None
        if isinstance(t, str):
            return t, str(cfg)
    return DEFAULT_TEMPLATE, "default"


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise LLMCError(f"the chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except TemplateError as e:  # the template refused these messages (raise_exception, a bad field)
            raise InputError(f"the chat template cannot render these messages: {e}") from None


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


__all__ = ["ChatTemplate", "find_template", "DEFAULT_TEMPLATE"]
