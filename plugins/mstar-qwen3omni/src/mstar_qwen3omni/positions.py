"""Qwen3-Omni's multimodal rotary positions for one prompt (HF's `get_rope_index`).

Each prompt token gets three positions (time, height, width). Text advances all three by
one per token. Audio placeholders do the same (audio is 1-D). An image's or video's
placeholders take a grid: time `t · position_id_per_seconds` (a video's `t` counts
`second_per_grid` seconds per temporal patch; an image has one), height and width the
merged patch's row and column, all offset by the position where the item starts. The token
after a media item continues at one past the largest position of the item's last piece.
With `use_audio_in_video` a video's placeholders and its audio's are interleaved by time
(`<|vision_start|><|audio_start|> ... <|audio_end|><|vision_end|>`, both markers of each
side counted as the item's begin and end). Decoding continues at `index + delta`.

Written after HF's `Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index`
(and tested against it), including where it is peculiar: the start after an interleaved
audio-and-video item is one past the largest position of the *last piece* appended (the
remaining run of whichever side ran out last), and items are found by scanning for their
start markers, so a prompt the processor did not make is read the same odd way HF reads
it. HF keeps positions as floats; ours are integers (a video whose `second_per_grid ·
position_id_per_seconds` is not whole has its time positions floored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MediaTokens:
    """The ids positions depend on (the thinker config's)."""

    audio: int
    image: int
    video: int
    audio_start: int
    vision_start: int
    position_id_per_seconds: float
    spatial_merge_size: int


def _run(start: float, n: int) -> torch.Tensor:
    """[3, n]: positions start .. start + n - 1 on every axis."""
    return (torch.arange(n, dtype=torch.float64) + start).expand(3, n)


def grid_positions(start: float, grid_thw: Sequence[int], t_step: float,
                   merge: int) -> torch.Tensor:
    """[3, t·h·w / merge²]: a vision item's (time, row, column) per merged patch, time
    advancing `t_step` per temporal patch, row-major within a frame, offset by `start`."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    time = (torch.arange(t, dtype=torch.float64) * t_step).view(-1, 1, 1).expand(t, h, w)
    rows = torch.arange(h, dtype=torch.float64).view(1, -1, 1).expand(t, h, w)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, -1).expand(t, h, w)
    return torch.stack([time.reshape(-1), rows.reshape(-1), cols.reshape(-1)]) + start


def _find(tokens: list[int], token: int, start: int) -> int:
    try:
        return tokens.index(token, start)
    except ValueError:
        return len(tokens) + 1


def mrope_positions(input_ids: Sequence[int], media: MediaTokens, *,
                    image_grids: Sequence[Sequence[int]] = (),
                    video_grids: Sequence[Sequence[int]] = (),
                    audio_tokens: Sequence[int] = (),
                    second_per_grid: Sequence[float] = (),
                    use_audio_in_video: bool = False) -> tuple[torch.Tensor, int]:
    """Positions [3, L] (long) of prompt `input_ids` and the decode delta (a token at
    index i >= L sits at i + delta on every axis). `image_grids`/`video_grids`: each item's
    (t, h, w) patch grid; `audio_tokens`: each audio's placeholder count (the encoder's
    output length); `second_per_grid`: seconds per temporal patch of each video."""
    tokens = [int(t) for t in input_ids]
    if not image_grids and not video_grids:  # HF: text and audio are all 1-D
        return torch.arange(len(tokens)).expand(3, -1).clone(), 0
    after_vision = [tokens[i + 1] for i, t in enumerate(tokens[:-1])
                    if t == media.vision_start]
    images = after_vision.count(media.image)
    videos = after_vision.count(media.audio_start if use_audio_in_video else media.video)
    audios = tokens.count(media.audio_start)
    items = images + audios + (0 if use_audio_in_video else videos)
    has_vision = media.image in tokens or media.video in tokens
    has_audio = media.audio in tokens
    pieces: list[torch.Tensor] = []
    st = image_i = video_i = audio_i = 0

    def next_start() -> float:
        return float(pieces[-1].max()) + 1 if pieces else 0.0

    for _ in range(items):
        pos = next_start()
        vision_at = (_find(tokens, media.vision_start, st)
                     if has_vision and (videos > 0 or images > 0) else len(tokens) + 1)
        audio_at = (_find(tokens, media.audio_start, st) if has_audio and audios > 0
                    else len(tokens) + 1)
        at = min(vision_at, audio_at)
        text = at - st
        if text:
            pieces.append(_run(pos, text))
            pos += text
        interleaved = at == vision_at and vision_at + 1 == audio_at
        marker = 2 if interleaved else 1
        pieces.append(_run(pos, marker))
        pos += marker
        merge = media.spatial_merge_size
        if at == audio_at:
            n = int(audio_tokens[audio_i])
            pieces.append(_run(pos, n))
            st += text + marker + n + marker
            audio_i, audios = audio_i + 1, audios - 1
        elif tokens[at + 1] == media.image:
            grid = image_grids[image_i]
            pieces.append(grid_positions(pos, grid, media.position_id_per_seconds, merge))
            st += text + marker + _merged(grid, merge) + marker
            image_i, images = image_i + 1, images - 1
        elif tokens[at + 1] == media.video:
            grid = video_grids[video_i]
            step = float(second_per_grid[video_i]) * media.position_id_per_seconds
            pieces.append(grid_positions(pos, grid, step, merge))
            st += text + marker + _merged(grid, merge) + marker
            video_i, videos = video_i + 1, videos - 1
        elif interleaved:
            n = int(audio_tokens[audio_i])
            grid = video_grids[video_i]
            step = float(second_per_grid[video_i]) * media.position_id_per_seconds
            pieces.extend(_interleave(grid_positions(pos, grid, step, merge), _run(pos, n)))
            st += text + marker + n + _merged(grid, merge) + marker
            audio_i, video_i = audio_i + 1, video_i + 1
            audios, videos = audios - 1, videos - 1
        pieces.append(_run(next_start(), marker))
    if st < len(tokens):
        pieces.append(_run(next_start(), len(tokens) - st))
    positions = torch.cat(pieces, dim=1).floor().long()
    return positions, int(positions.max()) + 1 - len(tokens)


def _merged(grid: Sequence[int], merge: int) -> int:
    return int(grid[0]) * int(grid[1]) * int(grid[2]) // (merge * merge)


def _interleave(video: torch.Tensor, audio: torch.Tensor) -> list[torch.Tensor]:
    """A video's and its audio's positions merged by time (video first on ties), one piece
    per token while both last, then the remaining run as one piece (as HF appends them)."""
    out: list[torch.Tensor] = []
    v = a = 0
    while v < video.shape[1] and a < audio.shape[1]:
        if video[0, v] <= audio[0, a]:
            out.append(video[:, v:v + 1])
            v += 1
        else:
            out.append(audio[:, a:a + 1])
            a += 1
    if v < video.shape[1]:
        out.append(video[:, v:])
    if a < audio.shape[1]:
        out.append(audio[:, a:])
    return out


def interleaved_placeholders(video_grid: Sequence[int], second_per_grid: float,
                             audio_tokens: int, media: MediaTokens) -> list[int]:
    """The placeholder ids of a video with its audio (between `<|audio_start|>` and
    `<|audio_end|>` inside the vision markers), ordered by time as HF's processor orders
    them: a video token at time t·second_per_grid·pps goes before audio token k when
    its time <= k."""
    merge = media.spatial_merge_size
    per_frame = (int(video_grid[1]) // merge) * (int(video_grid[2]) // merge)
    step = float(second_per_grid) * media.position_id_per_seconds
    times = [t * step for t in range(int(video_grid[0])) for _ in range(per_frame)]
    out: list[int] = []
    v = a = 0
    while v < len(times) and a < audio_tokens:
        if times[v] <= a:
            out.append(media.video)
            v += 1
        else:
            out.append(media.audio)
            a += 1
    out += [media.video] * (len(times) - v) + [media.audio] * (audio_tokens - a)
    return out
