"""The grammar of a `response_format`: compiled from a JSON schema, a regex or a Lark grammar
by llguidance, and validated without a tokenizer, so a bad format is refused at admission
(by the frontend, which has no model files) before any engine sees it. Both are cached.

JSON schemas compile to compact JSON with `json.dumps` spacing (`{"a": 1, "b": [2, 3]}`):
flexible whitespace lets a weak or confused model emit whitespace forever without ever
breaking the grammar; a schema may opt back in with `"x-guidance": {"whitespace_flexible":
true}`.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    from mstar.model.sampling import ResponseFormat

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

@functools.lru_cache(maxsize=256)
def _grammar(kind: str, schema: str) -> str:
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', defaults=_JSON_OPTIONS)
    if kind == "json_schema":
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"response_format: the JSON schema is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError("response_format: the JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(parsed, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(schema)
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(schema)
    raise ValueError(f"response_format: unknown type {kind!r}")


def grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar of a response format (cached); ValueError naming
    `response_format` when the schema is not JSON."""
    return _grammar(fmt.type, fmt.schema)


@functools.lru_cache(maxsize=256)
def _check(kind: str, schema: str) -> None:
    error = llguidance.LLMatcher.validate_grammar(_grammar(kind, schema))
    if error:
        raise ValueError(f"response_format: invalid {kind.replace('_', ' ')}: {error}")


def check_response_format(fmt: ResponseFormat) -> None:
    """Reject a bad schema, regex or grammar at admission: llguidance validates it without a
    tokenizer, so the frontend needs no model files for it. Results are cached."""
    _check(fmt.type, fmt.schema)


__all__ = ["check_response_format", "grammar_text"]
