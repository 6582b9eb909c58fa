"""Qwen3-Omni's multimodal positions (`mstar_qwen3omni.positions`) against transformers'
`get_rope_index` and the processor's audio-in-video placeholder order, on prompts mixing
text, images, audio, video and video with its audio."""

from __future__ import annotations

import types
from functools import partial

import pytest
import torch
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoePreTrainedModelForConditionalGeneration as HFOmni,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    _get_feat_extract_output_lengths,
)
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

from mstar_qwen3omni.config import Qwen3OmniConfig
from mstar_qwen3omni.positions import MediaTokens, interleaved_placeholders, mrope_positions

CFG = Qwen3OmniConfig()  # the real ids
MEDIA = MediaTokens(audio=CFG.audio_token_id, image=CFG.image_token_id,
                    video=CFG.video_token_id, audio_start=CFG.audio_start_token_id,
                    vision_start=CFG.vision_start_token_id,
                    position_id_per_seconds=CFG.position_id_per_seconds, spatial_merge_size=2)
TEXT = [9707, 11, 1879, 0, 358]  # any ordinary ids


def hf_rope_index(ids, *, images=(), videos=(), mel_frames=(), second_per_grid=(),
                  use_audio_in_video=False):
    """transformers' get_rope_index on one sequence (audio given as mel frame counts)."""
    config = Qwen3OmniMoeThinkerConfig(**{k: v for k, v in CFG.thinker_config.items()
                                          if not k.endswith("_config")},
                                       audio_config=CFG.thinker_config["audio_config"])
    owner = types.SimpleNamespace(config=config, spatial_merge_size=2)
    owner.get_llm_pos_ids_for_vision = partial(HFOmni.get_llm_pos_ids_for_vision, owner)

    def as_long(rows):
        return torch.tensor(rows, dtype=torch.long) if rows else None

    positions, delta = HFOmni.get_rope_index(
        owner, torch.tensor([ids]), image_grid_thw=as_long(images),
        video_grid_thw=as_long(videos), attention_mask=torch.ones(1, len(ids)),
        use_audio_in_video=use_audio_in_video,
        audio_seqlens=torch.tensor(mel_frames) if mel_frames else None,
        second_per_grids=torch.tensor(second_per_grid) if second_per_grid else None)
    return positions[:, 0], int(delta)


def audio_tokens(frames: int) -> int:
    return int(_get_feat_extract_output_lengths(torch.tensor(frames), 50))


def vision(kind: int, grid) -> list[int]:
    return [MEDIA.vision_start, *[kind] * (grid[0] * grid[1] * grid[2] // 4),
            CFG.vision_end_token_id]


def audio(frames: int) -> list[int]:
    return [MEDIA.audio_start, *[MEDIA.audio] * audio_tokens(frames), CFG.audio_end_token_id]


def audio_video(grid, frames, second):
    inner = interleaved_placeholders(grid, second, audio_tokens(frames), MEDIA)
    return [MEDIA.vision_start, MEDIA.audio_start, *inner, CFG.audio_end_token_id,
            CFG.vision_end_token_id]


def check(ids, **media):
    ours, delta = mrope_positions(
        ids, MEDIA, image_grids=media.get("images", ()), video_grids=media.get("videos", ()),
        audio_tokens=[audio_tokens(f) for f in media.get("mel_frames", ())],
        second_per_grid=media.get("second_per_grid", ()),
        use_audio_in_video=media.get("use_audio_in_video", False))
    theirs, their_delta = hf_rope_index(ids, **media)
    assert ours.dtype == torch.long and ours.shape == (3, len(ids))
    assert torch.equal(ours, theirs.long()), (ours, theirs)
    assert theirs.equal(theirs.floor()), "the case must have whole positions"
    assert delta == their_delta
    return ours, delta


def test_mixed_prompt_matches_transformers():
    images, videos = [[1, 4, 6], [1, 8, 4]], [[3, 4, 4]]
    ids = (TEXT + vision(MEDIA.image, images[0]) + TEXT[:2] + audio(230)
           + vision(MEDIA.video, videos[0]) + vision(MEDIA.image, images[1]) + audio(61)
           + TEXT)
    positions, delta = check(ids, images=images, videos=videos, mel_frames=[230, 61],
                             second_per_grid=[1.0])
    assert delta != 0  # grids and time steps move decoding off the token index
    # the 2nd video frame starts position_id_per_seconds after the first on the time axis
    start = ids.index(MEDIA.video)
    assert positions[0, start + 4] - positions[0, start] == CFG.position_id_per_seconds


@pytest.mark.parametrize(("grid", "frames", "second"), [
    ([4, 4, 8], 350, 2.0),
    # a wide frame and a short audio: the audio's last tokens come after the video's, and
    # the text after the item starts past them, not past the video's widest column
    ([2, 4, 40], 116, 1.0)])
def test_audio_in_video_matches_transformers(grid, frames, second):
    ids = (TEXT + audio_video(grid, frames, second) + TEXT + vision(MEDIA.image, [1, 4, 4])
           + audio(100) + TEXT)
    check(ids, images=[[1, 4, 4]], videos=[grid], mel_frames=[frames, 100],
          second_per_grid=[second], use_audio_in_video=True)


def test_text_and_audio_only_are_sequential():
    ids = TEXT + audio(160) + TEXT
    positions, delta = mrope_positions(ids, MEDIA, audio_tokens=[audio_tokens(160)])
    assert torch.equal(positions, torch.arange(len(ids)).expand(3, -1)) and delta == 0
    check(ids + vision(MEDIA.image, [1, 2, 2]), images=[[1, 2, 2]], mel_frames=[160])


@pytest.mark.parametrize(("grid", "second", "frames"), [([2, 4, 4], 1.0, 300),
                                                          ([3, 2, 6], 2.0, 90)])
def test_audio_in_video_order_matches_the_processor(grid, second, frames):
    owner = types.SimpleNamespace(
        audio_bos_token="<A>", audio_eos_token="</A>", video_token="V", audio_token="a",
        video_processor=types.SimpleNamespace(merge_size=2))
    text = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
        owner, {"video_grid_thw": [torch.tensor(grid)], "video_second_per_grid": [second]},
        0, {"num_audio_tokens": [audio_tokens(frames)]}, 0,
        position_id_per_seconds=CFG.position_id_per_seconds)
    ours = interleaved_placeholders(grid, second, audio_tokens(frames), MEDIA)
    letters = "".join("V" if t == MEDIA.video else "a" for t in ours)
    assert text == f"<A>{letters}</A>"
