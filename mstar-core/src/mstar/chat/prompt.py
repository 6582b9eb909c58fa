"""A chat request as a model sees it: the rendered prompt text and the decoded media.

The API server checks the OpenAI-shaped messages, fetches media and sends the data worker
normalised messages whose media parts point into the request's blobs
(`{"type": "image" | "audio" | "video", "blob": i}`). Here the blobs are decoded (within
the deployment's media limits), the model's chat template renders the messages, and the
model's `process_chat` gets a `ChatPrompt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mstar.chat.template import render_chat

if TYPE_CHECKING:
    from PIL.Image import Image

    from mstar.media import Audio, MediaLimits, Video
    from mstar.model.contract import Model

MEDIA_KINDS = ("image", "audio", "video")


@dataclass
class ChatPrompt:
    """`text`: the rendered conversation, where the template put each media item's marker
    (in message order); `images`, `audios`, `videos`: the decoded items in that same order;
    `media_hashes`: a hash of each item's bytes by kind, in order (caches key on them)."""

    text: str
    images: list[Image] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    media_hashes: dict[str, list[str]] = field(default_factory=dict)


def _decode(kind: str, data: bytes, part: Mapping[str, Any], limits: MediaLimits,
            audio_rate: int | None) -> Any:
    from mstar import media

    if kind == "image":
        return media.load_image(data, limits)
    if kind == "audio":
        return media.load_audio(data, limits, sample_rate=audio_rate)
    return media.load_video(data, limits, fps=float(part.get("fps") or 2.0),
                            audio_rate=audio_rate)


def build_chat_prompt(model: Model, messages: Sequence[Mapping[str, Any]],
                      blobs: Sequence[bytes], limits: MediaLimits, *,
                      template_kwargs: Mapping[str, Any] | None = None) -> ChatPrompt:
    """Decode the media the messages point to (audio, and a video's sound, at the model's
    `audio_input_rate()`) and render the model's chat template. Bad media or a template
    that refuses the conversation raise ValueError (400)."""
    from mstar import media

    template = model.chat_template()
    if template is None:
        raise ValueError(f"{type(model).__name__} has no chat template: use /generate")
    decoded: dict[str, list[Any]] = {kind: [] for kind in MEDIA_KINDS}
    hashes: dict[str, list[str]] = {kind: [] for kind in MEDIA_KINDS}
    rendered: list[dict[str, Any]] = []
    for m_index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for p_index, part in enumerate(content):
                kind = part.get("type")
                if kind in MEDIA_KINDS:
                    data = blobs[int(part["blob"])]
                    try:
                        decoded[kind].append(_decode(kind, data, part, limits,
                                                     model.audio_input_rate()))
                    except media.MediaError as exc:
                        exc.param = exc.param or f"messages[{m_index}].content[{p_index}]"
                        raise
                    hashes[kind].append(media.media_hash(data))
                    parts.append({"type": kind})
                else:
                    parts.append(dict(part))
            content = parts
        rendered.append({**message, "content": content})
    tokenizer = model.tokenizer()
    variables = {name: _special(tokenizer, name) for name in ("bos_token", "eos_token")}
    if template_kwargs and "messages" in template_kwargs:
        from mstar.errors import RequestError

        raise RequestError("chat_template_kwargs may not set `messages` (the conversation "
                           "is the request's)", param="chat_template_kwargs.messages")
    text = render_chat(template, rendered, **{**variables, **dict(template_kwargs or {})})
    return ChatPrompt(text, decoded["image"], decoded["audio"], decoded["video"],
                      {k: v for k, v in hashes.items() if v})


def _special(tokenizer: Any, name: str) -> str:
    """A tokenizer's special token text (`bos_token`), "" when it has none."""
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) else ""
