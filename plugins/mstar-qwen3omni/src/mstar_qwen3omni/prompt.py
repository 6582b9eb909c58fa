"""The Thinker's prompt with its media expanded, and the Talker's host values (host side).

The chat template writes one placeholder per media item (`<|audio_pad|>`, `<|image_pad|>`,
`<|video_pad|>`, each between its start and end markers). `build_prompt` expands each to
as many rows as the item's encoder gives (audio: the encoder's output length; image and
video: patches / merge²; a video with its audio, `use_audio_in_video`: the video's and
the audio's rows interleaved by time between `<|audio_start|>` and `<|audio_end|>`, as HF's
processor does), computes the multimodal positions (`positions.mrope_positions`), and cuts
the prompt into the items the Thinker prefills one walk each: runs of text, and each media
item's placeholder rows (the markers are text).

Media arrive already preprocessed (`Encoded`: the encoder's input tensors and its row
count), so this module is plain bookkeeping; `model.py` runs the processor's steps.
All media tensors of a request travel as one flat float32 `media` tensor; an item names
its tensors by (offset, shape) in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mstar_qwen3omni.config import Qwen3OmniConfig
from mstar_qwen3omni.positions import MediaTokens, interleaved_placeholders, mrope_positions

#: Walk of each prompt item kind (the last text item samples the first token: `PREFILL_LAST`).
PREFILL_WALKS = {"text": "prefill_text", "audio": "prefill_audio", "vision": "prefill_vision",
                 "video_audio": "prefill_video_audio"}
PREFILL_LAST = "prefill_last"


@dataclass
class Encoded:
    """One media item ready for its encoder: `tensors` by the encoder's input name
    (`input_features`; `pixel_values`), host values (`grid_thw`, `second_per_grid`) and the
    rows it becomes in the Thinker's prompt (`tokens`)."""

    kind: str  # "audio" | "image" | "video"
    tensors: dict[str, torch.Tensor]
    tokens: int
    grid_thw: tuple[int, int, int] | None = None
    second_per_grid: float | None = None
    audio: Encoded | None = None  # a video's own audio (use_audio_in_video)


@dataclass
class ThinkerPrompt:
    """`ids` [L] with media expanded, `positions` [3, L] and the decode `delta`, the
    prefill `items` (host dicts, see `build_prompt`), the flat `media` tensor (None when
    there are no media) and the rows each kind of media took (`media_rows`)."""

    ids: list[int]
    positions: torch.Tensor
    delta: int
    items: list[dict[str, Any]]
    media: torch.Tensor | None
    media_rows: dict[str, int] = field(default_factory=dict)
    #: What the Talker's positions need (HF gives its `get_rope_index` the same media).
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)
    audio_tokens: list[int] = field(default_factory=list)
    second_per_grid: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> torch.Tensor:
        """[4, L] long: the ids, then the three position axes (what prefill walks slice)."""
        return torch.cat([torch.tensor(self.ids, dtype=torch.long)[None], self.positions])


def media_tokens(cfg: Qwen3OmniConfig) -> MediaTokens:
    return MediaTokens(audio=cfg.audio_token_id, image=cfg.image_token_id,
                       video=cfg.video_token_id, audio_start=cfg.audio_start_token_id,
                       vision_start=cfg.vision_start_token_id,
                       position_id_per_seconds=cfg.position_id_per_seconds,
                       spatial_merge_size=cfg.spatial_merge_size)


class _Media:
    """The flat media tensor under construction: each tensor's (offset, shape)."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.offset = 0

    def add(self, tensor: torch.Tensor) -> list[Any]:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        self.parts.append(flat)
        at = [self.offset, list(tensor.shape)]
        self.offset += flat.numel()
        return at

    def tensor(self) -> torch.Tensor | None:
        return torch.cat(self.parts) if self.parts else None


def build_prompt(ids: Sequence[int], cfg: Qwen3OmniConfig, *, images: Sequence[Encoded] = (),
                 audios: Sequence[Encoded] = (), videos: Sequence[Encoded] = (),
                 use_audio_in_video: bool = False) -> ThinkerPrompt:
    """Expand the placeholders of tokenized prompt `ids` with the media, in order (the
    i-th `<|image_pad|>` is `images[i]`, ...). ValueError when the counts differ or a video
    lacks its audio under `use_audio_in_video`.

    Items (in prompt order, covering every row once): `{"kind": "text", "start", "length"}`;
    `{"kind": "audio", ..., "input_features": at}`; `{"kind": "vision", ...,
    "pixel_values": at, "grid_thw": [t, h, w]}`; `{"kind": "video_audio", ...,
    "pixel_values", "grid_thw", "input_features"}` (`at` = [offset, shape] in `media`)."""
    mt = media_tokens(cfg)
    placeholders = {mt.audio: ("audio", iter(audios)), mt.image: ("image", iter(images)),
                    mt.video: ("video", iter(videos))}
    counts = {"audio": len(audios), "image": len(images), "video": len(videos)}
    seen = {kind: sum(1 for t in ids if t == tok) for tok, (kind, _) in placeholders.items()
            for kind in [kind]}
    for kind, n in counts.items():
        if seen[kind] != n:
            raise ValueError(f"the prompt has {seen[kind]} {kind} placeholder(s) for {n} "
                             f"{kind}(s)")
    out: list[int] = []
    items: list[dict[str, Any]] = []
    media = _Media()
    rows = {"audio": 0, "image": 0, "video": 0}
    prompt = ThinkerPrompt([], torch.zeros(3, 0, dtype=torch.long), 0, [], None)

    def text_until(n: int) -> None:
        start = items[-1]["start"] + items[-1]["length"] if items else 0
        if n > start:
            items.append({"kind": "text", "start": start, "length": n - start})

    for token in ids:
        if token not in placeholders:
            out.append(int(token))
            continue
        kind, source = placeholders[token]
        item: Encoded = next(source)
        text_until(len(out))
        entry: dict[str, Any] = {"start": len(out)}
        if kind == "audio":
            out += [mt.audio] * item.tokens
            entry.update(kind="audio", input_features=media.add(item.tensors["input_features"]))
            prompt.audio_tokens.append(item.tokens)
        elif kind == "image" or (kind == "video" and not use_audio_in_video):
            out += [token] * item.tokens
            entry.update(kind="vision", pixel_values=media.add(item.tensors["pixel_values"]),
                         grid_thw=list(item.grid_thw or ()))
            (prompt.image_grids if kind == "image" else prompt.video_grids).append(
                tuple(item.grid_thw or ()))
            if kind == "video":
                prompt.second_per_grid.append(float(item.second_per_grid or 0.0))
        else:  # a video with its audio: <|audio_start|> interleaved rows <|audio_end|>
            if item.audio is None:
                raise ValueError("use_audio_in_video: the video has no audio track")
            grid = tuple(item.grid_thw or ())
            inner = interleaved_placeholders(grid, float(item.second_per_grid or 0.0),
                                             item.audio.tokens, mt)
            out.append(cfg.audio_start_token_id)
            entry["start"] = len(out)
            out += inner
            entry.update(kind="video_audio",
                         pixel_values=media.add(item.tensors["pixel_values"]),
                         grid_thw=list(grid),
                         input_features=media.add(item.audio.tensors["input_features"]))
            prompt.video_grids.append(grid)
            prompt.second_per_grid.append(float(item.second_per_grid or 0.0))
            prompt.audio_tokens.append(item.audio.tokens)
            rows["audio"] += item.audio.tokens
            out.append(cfg.audio_end_token_id)
            entry["length"] = len(inner)
            items.append(entry)
            rows[kind] += item.tokens
            continue
        rows[kind] += item.tokens
        entry["length"] = len(out) - entry["start"]
        items.append(entry)
    text_until(len(out))
    positions, delta = mrope_positions(
        out, mt, image_grids=prompt.image_grids, video_grids=prompt.video_grids,
        audio_tokens=prompt.audio_tokens, second_per_grid=prompt.second_per_grid,
        use_audio_in_video=use_audio_in_video)
    prompt.ids, prompt.positions, prompt.delta, prompt.items = out, positions, delta, items
    prompt.media = media.tensor()
    prompt.media_rows = {k: v for k, v in rows.items() if v}
    return prompt


def prefill_schedule(items: Sequence[dict[str, Any]]) -> Iterator[str]:
    """The walk of each item: its kind's, the last one (text: the assistant's start)
    sampling the first token."""
    for i, item in enumerate(items):
        if i == len(items) - 1:
            if item["kind"] != "text":
                raise ValueError("the prompt must end with text (the assistant's turn)")
            yield PREFILL_LAST
        else:
            yield PREFILL_WALKS[item["kind"]]


def talker_inputs(prompt: ThinkerPrompt, cfg: Qwen3OmniConfig, speaker: str) -> dict[str, Any]:
    """The Talker walk's host values: `talker.talker_prompt_plan`'s (which Thinker rows are
    user rows, which of them media, where the assistant's turn starts), the speaker's code
    (`talker_speaker`) and the Talker prompt's positions (`talker_positions` [3, users +
    9]): HF runs `get_rope_index` over the user ids followed by nine `tts_pad` ids with the
    same media (and without `use_audio_in_video`, which its `generate` does not pass on).
    Its decoding continues one past the largest position, as the engine does."""
    from mstar_qwen3omni.talker import ASSISTANT_ROWS, talker_prompt_plan

    plan = talker_prompt_plan(prompt.ids, cfg.talker(), im_start_id=cfg.im_start_token_id,
                              user_id=cfg.user_token_id, assistant_id=cfg.assistant_token_id)
    talker_ids = [prompt.ids[i] for i in plan["talker_user_rows"]]
    talker_ids += [cfg.tts_pad_token_id] * ASSISTANT_ROWS
    positions, _ = mrope_positions(
        talker_ids, media_tokens(cfg), image_grids=prompt.image_grids,
        video_grids=prompt.video_grids, audio_tokens=prompt.audio_tokens,
        second_per_grid=prompt.second_per_grid, use_audio_in_video=False)
    return {**plan, "talker_speaker": cfg.speakers[speaker], "talker_positions": positions}
