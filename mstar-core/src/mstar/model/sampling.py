"""Sampling parameters: one set per sampling site of a request (default site: "default"),
and the registry of named logits processors that requests may ask for (here, below the
engine, so a request is checked at admission without importing the engine)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import torch

#: A logits processor sees the token ids generated so far at this site and the logits row
#: [vocab] and returns new logits. Registered by name (see `mstar.engine.sampler`).
LogitsProcessor = Callable[[Sequence[int], "object"], "object"]


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    """A grammar the sampled text must follow (structured outputs).

    `schema` is the JSON schema as a JSON string (`json_schema`), the regular expression
    (`regex`) or the Lark grammar (`lark`); `json_object` (any JSON object) needs none. It is
    a string so the params stay hashable and travel in control messages unchanged."""

    type: Literal["json_object", "json_schema", "regex", "lark"]
    schema: str = ""


def check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    """A request's `logit_bias` (OpenAI's): token ids as JSON keys -> a bias in [-100, 100]
    added to the token's logit before sampling. Whether each id is in the vocabulary is
    checked where the tokenizer is known (the frontend)."""
    for key, bias in (value or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"biases must be in [-100, 100], got {bias:g} for token {key}")
    return value


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI/vLLM-style sampling controls. `temperature` 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int | None = 16
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    logits_processors: list[str] = []
    response_format: ResponseFormat | None = None
    #: token id -> bias in [-100, 100] added to its logit before anything else (OpenAI's
    #: `logit_bias`); ids past the logits' vocabulary are ignored by the sampler.
    logit_bias: dict[int, float] = {}

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the bad field; return self when valid."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for token, bias in self.logit_bias.items():
            if token < 0 or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: token ids must be >= 0 and biases in "
                                 f"[-100, 100], got {token}: {bias:g}")
        if self.response_format is not None:
            from mstar.model.grammar import check_response_format

            check_response_format(self.response_format)
        return self


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`. The schema is always enforced: `strict` is
    accepted for compatibility and changes nothing."""

    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatField(BaseModel):
    """OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type":
    "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema"}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_params(self) -> ResponseFormat | None:
        """The core `ResponseFormat` (None for text); ValueError naming the missing part."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("response_format: type json_schema needs json_schema.schema")
        return ResponseFormat(type="json_schema", schema=json.dumps(self.json_schema.schema_))


class SamplingFields(BaseModel):
    """The sampling fields of a request body, as a pydantic mixin for models' request
    schemas (`class MyRequest(SamplingFields): prompt: str`). Unset fields keep
    `SamplingParams`' defaults; `sampling_params()` validates them together."""

    max_tokens: int = Field(16, description="Tokens to generate at most.")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    logits_processors: list[str] = Field(default_factory=list)
    response_format: ResponseFormatField | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (a JSON key) -> bias in [-100, 100] added to its logit.")

    _logit_bias = field_validator("logit_bias")(check_logit_bias)

    def sampling_params(self, *, eos_token_ids: Sequence[int] = ()) -> SamplingParams:
        """The request's SamplingParams (ValueError naming the bad field). EOS ids join
        `stop_token_ids` unless `ignore_eos`."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "logprobs")
            if getattr(self, name) is not None}
        for name in self.logits_processors:
            get_logits_processor(name)
        stops = [*self.stop_token_ids, *([] if self.ignore_eos else eos_token_ids)]
        fmt = self.response_format.to_params() if self.response_format is not None else None
        bias = {int(key): value for key, value in (self.logit_bias or {}).items()}
        return SamplingParams(max_tokens=self.max_tokens, n=self.n, stop_token_ids=stops,
                              ignore_eos=self.ignore_eos,
                              logits_processors=list(self.logits_processors),
                              response_format=fmt, logit_bias=bias, **given).validate()


#: A logits processor sees the token ids generated so far at this site and one logits row
#: [V] and returns the new row.
LogitsProcessorFn = Callable[[Sequence[int], "torch.Tensor"], "torch.Tensor"]

_PROCESSORS: dict[str, LogitsProcessorFn] = {}


def register_logits_processor(name: str, fn: LogitsProcessorFn) -> None:
    """Make `fn` available to requests as `logits_processors=[name]`.

    Registering the same function again is a no-op; another function under a taken name is
    an error, so two plugins cannot silently shadow each other."""
    if name in _PROCESSORS and _PROCESSORS[name] is not fn:
        raise ValueError(f"logits processor {name!r} is already registered")
    _PROCESSORS[name] = fn


def logits_processor_names() -> list[str]:
    return sorted(_PROCESSORS)


def get_logits_processor(name: str) -> LogitsProcessorFn:
    """The processor registered as `name`; ValueError listing the known ones otherwise (call
    it at admission to reject a request early)."""
    if name not in _PROCESSORS:
        known = ", ".join(logits_processor_names()) or "none"
        raise ValueError(f"unknown logits processor {name!r}; registered: {known}")
    return _PROCESSORS[name]
