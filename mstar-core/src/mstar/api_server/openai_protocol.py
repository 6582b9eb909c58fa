"""OpenAI's request and response shapes for `/v1/chat/completions` and `/v1/completions`.

Requests are strict pydantic models, as OpenAI's API is: an unknown field (`max_token`) or
a wrong type (`"max_tokens": "8"`, `"stream": "false"`) is a 400 whose `param` names it
(floats take integers). `native_fields` turns one into the sampling fields every model's
request takes (`mstar.model.SamplingFields`), and the `*_response` / `*_chunk` functions
build the answers from `mstar.events`. vLLM's extensions that users rely on (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `chat_template_kwargs`) are accepted too.
OpenAI's fields that cannot change the output are accepted and ignored (`IGNORED_FIELDS`);
those that would and are not supported are refused (`check_chat`, `check_completion`).
A spoken reply (`modalities: ["text", "audio"]`, `audio: {"voice", "format"}`) is
`message.audio` (`chat_audio`), streamed as `delta.audio` pieces.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mstar import events
from mstar.model.requests import named_field
from mstar.model.sampling import ResponseFormatField, check_logit_bias

_FORBID = ConfigDict(extra="forbid")
#: OpenAI's fields that are accepted and have no effect here: none changes the output.
IGNORED_FIELDS = ("user", "store", "metadata", "service_tier", "parallel_tool_calls",
                  "prompt_cache_key", "safety_identifier", "prediction")


class TextPart(BaseModel):
    model_config = _FORBID
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _FORBID
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _FORBID
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = _FORBID
    data: str = Field(description="base64 audio bytes")
    format: str = Field(description="wav, mp3, flac, ogg, ...")


class AudioPart(BaseModel):
    model_config = _FORBID
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(BaseModel):
    model_config = _FORBID
    url: str
    fps: float | None = Field(None, gt=0, le=30, description="Frames sampled per second.")


class VideoPart(BaseModel):
    model_config = _FORBID
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | AudioPart | VideoPart,
                        Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _FORBID
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # What an assistant message returned by the API carries, so a client can send it back
    # as it came: a refusal and annotations are kept out of the prompt; tool and audio
    # outputs only when empty (check_chat: tool calling is refused; a spoken reply is not
    # kept, so its audio cannot be referred to).
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


#: The chat's audio formats (OpenAI's names) -> `mstar.media.audio_out`'s names.
CHAT_AUDIO_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "opus": "opus",
                      "aac": "aac", "pcm16": "pcm"}
#: The only format OpenAI streams a spoken reply in.
STREAMED_AUDIO_FORMAT = "pcm16"


class ChatAudioParam(BaseModel):
    """`audio` of a chat asking for a spoken reply: the voice (None: the model's default)
    and the format of `message.audio.data`."""

    model_config = _FORBID
    voice: str | None = None
    format: Literal["wav", "mp3", "flac", "opus", "aac", "pcm16"]


class StreamOptions(BaseModel):
    model_config = _FORBID
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both routes share."""

    model_config = _FORBID
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # accepted and ignored (IGNORED_FIELDS)
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    _logit_bias = field_validator("logit_bias")(check_logit_bias)


#: What the refused fields accept (asking for nothing), as the OpenAPI document states it.
_REFUSED_SCHEMAS: dict[str, dict[str, Any]] = {
    "tools": {"type": "array", "maxItems": 0}, "functions": {"type": "array", "maxItems": 0},
    "tool_choice": {"enum": ["none", None]}, "function_call": {"enum": ["none", None]},
    "reasoning_effort": {"type": "null"}, "verbosity": {"type": "null"},
    "web_search_options": {"type": "null"}}


def _accepted_only(schema: dict[str, Any]) -> None:
    for name, accepted in _REFUSED_SCHEMAS.items():
        schema["properties"][name] = {**accepted, "description": "Not supported: refused "
                                      "unless it asks for nothing."}


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_accepted_only)

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormatField | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted and ignored (IGNORED_FIELDS)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    # a spoken reply (models with the "audio_output" capability; check_chat)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: ChatAudioParam | None = None
    # refused unless they ask for nothing (check_chat)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class InvalidRequest(ValueError):
    """A request OpenAI would refuse with 400; `param` names the field, `code` says how
    ("unknown_field", "invalid_type"; None: another bad value)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


#: Names pydantic puts in an error's location for the member of a union that failed.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|none|[a-z_-]+\[.*\])$")


def _loc(loc: Sequence[Any]) -> str:
    """pydantic's location as OpenAI writes `param`: messages[0].content[1].type."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and not _UNION_MEMBER.match(str(part)):
            out += ("." if out else "") + str(part)
    return out


T = TypeVar("T", bound=BaseModel)


def _got(error: Any) -> str:
    """The offending value, when it is short enough to quote."""
    value = error.get("input")
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 40:
        return f" (got {value!r})"
    return ""


def _code(error: Any) -> str | None:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown_field"
    return "invalid_type" if kind.endswith("_type") else None


def parse(model: type[T], body: dict[str, Any]) -> T:
    """`body` as `model`, strictly (no string to number or boolean coercion), or
    InvalidRequest naming the first bad field: an unknown one first, as OpenAI's
    "Unrecognized request argument supplied: <name>". A whole-request check (a model
    validator, which has no field location) names its field by starting its message with
    it: "n: at most 4 images"."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        # the deepest error first: in a union, the member that got furthest is the one meant
        errors = sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden",
                                                     -len(e["loc"])))
        first = errors[0]
        param = _loc(first["loc"]) or named_field(first["msg"], model)
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param,
                                 "unknown_field") from None
        detail = "; ".join(f"{_loc(e['loc']) or 'body'}: {e['msg']}{_got(e)}"
                           for e in errors[:5])
        raise InvalidRequest(f"invalid request: {detail}", param, _code(first)) from None


def check_common(req: _Sampling) -> None:
    """What OpenAI refuses before running anything (the model name is checked by the
    route: an unknown model is a 404)."""
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true",
                             "stream_options")


def wants_audio(req: ChatCompletionRequest) -> bool:
    """Whether the chat asks for a spoken reply (`check_chat` made `audio` present)."""
    return "audio" in (req.modalities or ())


def check_chat(req: ChatCompletionRequest) -> None:
    """OpenAI's fields that would change the output and are not supported are refused
    unless they ask for nothing (no tools); a spoken reply needs both `modalities` with
    "audio" and `audio`, and streams only as pcm16 (as OpenAI's does). Whether the model
    can speak is the route's check (its capabilities)."""
    if req.tools or req.tool_choice not in (None, "none") or req.functions or \
            req.function_call not in (None, "none"):
        raise InvalidRequest("tool calling is not supported yet", "tools")
    modalities = req.modalities or ["text"]
    if "text" not in modalities or len(set(modalities)) != len(modalities):
        raise InvalidRequest('modalities must be ["text"] or ["text", "audio"]', "modalities")
    if wants_audio(req):
        if req.audio is None:
            raise InvalidRequest('modalities with "audio" needs `audio` ({"voice", '
                                 '"format"})', "audio")
        if req.stream and req.audio.format != STREAMED_AUDIO_FORMAT:
            raise InvalidRequest(f"a streamed spoken reply is {STREAMED_AUDIO_FORMAT} (got "
                                 f"{req.audio.format!r}); ask for another format without "
                                 "stream", "audio.format")
    elif req.audio is not None:
        raise InvalidRequest('audio needs modalities ["text", "audio"]', "modalities")
    for name in ("reasoning_effort", "verbosity", "web_search_options"):
        if getattr(req, name) is not None:
            raise InvalidRequest(f"{name} is not supported", name)
    for i, message in enumerate(req.messages):
        for name in ("tool_calls", "function_call"):
            if getattr(message, name):
                raise InvalidRequest(f"messages[{i}].{name}: tool calls are not supported",
                                     f"messages[{i}].{name}")
        if message.audio:
            raise InvalidRequest(f"messages[{i}].audio: an earlier spoken reply is not kept "
                                 "(its expires_at has passed): send its transcript as the "
                                 "content", f"messages[{i}].audio")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if req.response_format is not None:
        from mstar.model.grammar import check_response_format

        try:
            fmt = req.response_format.to_params()
            if fmt is not None:
                check_response_format(fmt)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "response_format") from None


def check_completion(req: CompletionRequest) -> None:
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise InvalidRequest("prompt: give one string (batches of prompts are not "
                             "supported: send one request each)", "prompt")
    if req.echo or req.suffix is not None or req.best_of not in (None, 1):
        raise InvalidRequest("echo, suffix and best_of are not supported",
                             "echo" if req.echo else "suffix" if req.suffix else "best_of")


def native_fields(req: _Sampling, *, default_max_tokens: int) -> dict[str, Any]:
    """The sampling fields of a model's native request (`SamplingFields`)."""
    out: dict[str, Any] = {"n": req.n, "ignore_eos": req.ignore_eos}
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    out["max_tokens"] = max_tokens or default_max_tokens
    for name in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty",
                 "top_k", "min_p", "repetition_penalty", "stop", "logit_bias"):
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            out["logprobs"] = req.top_logprobs or 0
        fmt = req.response_format
        if fmt is not None and fmt.type != "text":
            out["response_format"] = fmt.model_dump(by_alias=True, exclude_none=True)
        if wants_audio(req):
            out["modalities"] = ["text", "audio"]
            if req.audio is not None and req.audio.voice is not None:
                out["voice"] = req.audio.voice
    elif isinstance(req, CompletionRequest) and req.logprobs is not None:
        out["logprobs"] = req.logprobs
    return out


# -- responses ------------------------------------------------------------------------------

def usage_json(usage: events.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="surrogatepass"))


def chat_logprobs(items: Sequence[events.TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": _token_bytes(lp.token),
             "top_logprobs": [{"token": text, "logprob": value, "bytes": _token_bytes(text)}
                              for text, (_, value) in zip(lp.top_tokens, lp.top)]}
            for lp in items]


def completion_logprobs(items: Sequence[events.TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs: parallel lists; `offset` is the text length before."""
    offsets = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [dict(zip(lp.top_tokens, (v for _, v in lp.top))) for lp in items],
            "text_offset": offsets}


class Choices:
    """Collects a request's events into its choices (text, logprobs, audio chunks) per
    index."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.logprobs: list[list[events.TokenLogprob]] = [[] for _ in range(n)]
        self.audio: list[list[events.AudioChunk]] = [[] for _ in range(n)]

    def add(self, event: events.TextDelta | events.AudioChunk) -> None:
        if isinstance(event, events.AudioChunk):
            self.audio[event.index].append(event)
            return
        self.text[event.index] += event.text
        if event.logprobs:
            self.logprobs[event.index].extend(event.logprobs)


def finish_reasons(done: events.Finished, n: int) -> list[str]:
    """OpenAI's finish_reason per choice ("stop" or "length"; a cut request says why)."""
    return [done.reasons.get(i, done.reason) for i in range(n)]


def chat_audio(rid: str, index: int, *, data: bytes | None = None,
               transcript: str | None = None, expires_at: int | None = None,
               sample_rate: int | None = None) -> dict[str, Any]:
    """OpenAI's `message.audio` of choice `index` (every field given), or a streamed
    `delta.audio` (those of the piece). `sample_rate` (of `data`) is mstar's addition: a
    pcm16 clip has no header that says it. Nothing is kept for a later turn to refer to,
    so `expires_at` is the response's `created`."""
    out: dict[str, Any] = {"id": f"audio_{rid}_{index}"}
    if data is not None:
        out["data"] = base64.b64encode(data).decode()
    for name, value in (("transcript", transcript), ("expires_at", expires_at),
                        ("sample_rate", sample_rate)):
        if value is not None:
            out[name] = value
    return out


def chat_response(rid: str, model: str, created: int, choices: Choices,
                  done: events.Finished, want_logprobs: bool,
                  audio: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The chat completion; with `audio` (each choice's `chat_audio`) the text is the
    audio's transcript and `content` is null, as OpenAI answers a spoken reply."""
    reasons = finish_reasons(done, len(choices.text))

    def message(i: int, text: str) -> dict[str, Any]:
        if audio is None:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "audio": audio[i]}

    return {
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created,
        "model": model, "system_fingerprint": None,
        "choices": [{"index": i, "message": message(i, text),
                     "logprobs": {"content": chat_logprobs(choices.logprobs[i])}
                     if want_logprobs else None,
                     "finish_reason": reasons[i]}
                    for i, text in enumerate(choices.text)],
        "usage": usage_json(done.usage),
    }


def completion_response(rid: str, model: str, created: int, choices: Choices,
                        done: events.Finished, want_logprobs: bool) -> dict[str, Any]:
    reasons = finish_reasons(done, len(choices.text))
    return {
        "id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": i, "text": text,
                     "logprobs": completion_logprobs(choices.logprobs[i], 0)
                     if want_logprobs else None,
                     "finish_reason": reasons[i]}
                    for i, text in enumerate(choices.text)],
        "usage": usage_json(done.usage),
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               *, finish_reason: str | None = None,
               logprobs: Sequence[events.TokenLogprob] | None = None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta,
                         "logprobs": {"content": chat_logprobs(logprobs)}
                         if logprobs is not None else None,
                         "finish_reason": finish_reason}]}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, *,
                     finish_reason: str | None = None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, usage: events.Usage,
                object_name: str) -> dict[str, Any]:
    prefix = "chatcmpl" if object_name == "chat.completion.chunk" else "cmpl"
    return {"id": f"{prefix}-{rid}", "object": object_name, "created": created,
            "model": model, "choices": [], "usage": usage_json(usage)}
