"""Sampling parameters: one set per sampling site of a request (default site: "default")."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
from pydantic import BaseModel, Field

#: A logits processor sees the token ids generated so far at this site and the logits row
#: [vocab] and returns new logits. Registered by name (see `mstar.engine.sampler`).
LogitsProcessor = Callable[[Sequence[int], "object"], "object"]


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
        return self


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

    def sampling_params(self, *, eos_token_ids: Sequence[int] = ()) -> SamplingParams:
        """The request's SamplingParams (ValueError naming the bad field). EOS ids join
        `stop_token_ids` unless `ignore_eos`."""
        from mstar.engine.sampler import get_logits_processor

        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "logprobs")
            if getattr(self, name) is not None}
        for name in self.logits_processors:
            get_logits_processor(name)
        stops = [*self.stop_token_ids, *([] if self.ignore_eos else eos_token_ids)]
        return SamplingParams(max_tokens=self.max_tokens, n=self.n, stop_token_ids=stops,
                              ignore_eos=self.ignore_eos,
                              logits_processors=list(self.logits_processors),
                              **given).validate()
