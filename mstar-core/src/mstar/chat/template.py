"""Chat templates: the Jinja templates Hugging Face checkpoints ship (`chat_template` in
tokenizer_config.json), rendered in a sandbox the way `transformers` renders them, so a
model's own template gives the prompt it was trained on."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template refused the conversation (`raise_exception`) or failed to render."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, **variables: Any) -> str:
    """The prompt text for `messages` (`{"role", "content"}` with content a string or a
    list of parts `{"type": "text", "text"}` / `{"type": "image"}` / `{"type": "audio"}` /
    `{"type": "video"}`, as HF templates expect). `variables` reach the template too
    (`bos_token`, `eos_token`, ...). A template error is a `TemplateError` (bad input)."""
    try:
        return _compile(template).render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template failed: {exc}") from None
