"""The host-side processing against transformers where it runs without torchvision: images
against `Qwen2VLImageProcessorPil` configured as Qwen3-Omni's preprocessor_config.json;
audio against `WhisperFeatureExtractor` called as `Qwen3OmniMoeProcessor` calls it, with a
sine's energy in the right mel band and the token count the processor gives; video by the
plain reading of `Qwen2VLVideoProcessor` (frame padding, patch order, seconds per grid), a
still video equal to the image path at the video's bounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (
    Qwen3OmniMoeProcessor,
    _get_feat_extract_output_lengths,
)

from mstar.model import config_from_fields
from mstar_qwen3omni.audio_encoder import audio_output_length
from mstar_qwen3omni.processing import (
    DEFAULT,
    ProcessorConfig,
    audio_features,
    image_patches,
    smart_resize,
    video_patches,
)

#: Qwen/Qwen3-Omni-30B-A3B-Instruct's preprocessor_config.json (the fields it holds).
PREPROCESSOR_CONFIG = {
    "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "image_mean": [0.5, 0.5, 0.5], "image_processor_type":
    "Qwen2VLImageProcessor", "image_std": [0.5, 0.5, 0.5], "max_pixels": 12845056,
    "merge_size": 2, "min_pixels": 3136, "n_fft": 400, "n_samples": 4800000,
    "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0, "patch_size": 16,
    "processor_class": "Qwen3OmniMoeProcessor", "return_attention_mask": True,
    "sampling_rate": 16000, "temporal_patch_size": 2}


def test_the_defaults_are_the_checkpoint_preprocessor_config() -> None:
    cfg = config_from_fields(ProcessorConfig, PREPROCESSOR_CONFIG)
    assert dataclasses.replace(cfg, image_mean=tuple(cfg.image_mean),
                               image_std=tuple(cfg.image_std)) == DEFAULT
    size = Qwen3OmniMoeProcessor.videos_kwargs["size"]
    assert (DEFAULT.video_min_pixels, DEFAULT.video_max_pixels) == (
        size["shortest_edge"], size["longest_edge"])


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(100, 70), (33, 41), (640, 90)])
def test_image_patches_equal_transformers_pil_processor(size: tuple[int, int]) -> None:
    """Up- (33x41 -> min_pixels), down-free and wide images; the processor built from the
    checkpoint's config as transformers' AutoImageProcessor would (PIL backend)."""
    oracle = Qwen2VLImageProcessorPil(**{k: PREPROCESSOR_CONFIG[k] for k in (
        "image_mean", "image_std", "min_pixels", "max_pixels", "patch_size",
        "temporal_patch_size", "merge_size")})
    image = _image(*size, seed=sum(size))
    want = oracle(images=[image], return_tensors="np")
    pixel_values, grid_thw = image_patches(image)
    assert grid_thw.tolist() == want["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(pixel_values.numpy(), want["pixel_values"], atol=1e-6, rtol=0)


def test_image_patch_rows_are_blocks_of_merged_tokens() -> None:
    """A 64x32 image is a 4x2 grid of 16-pixel patches; rows come merge block by merge
    block (2x2 patches each), each row channel-major, the frame repeated, then py, px."""
    image = np.zeros((64, 32, 3), dtype=np.uint8)
    for r in range(4):
        for c in range(2):
            image[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)] = 10 * r + c + 1
    pixel_values, grid = image_patches(Image.fromarray(image),
                                       dataclasses.replace(DEFAULT, min_pixels=1))
    assert grid.tolist() == [1, 4, 2] and pixel_values.shape == (8, 3 * 2 * 16 * 16)
    values = ((pixel_values[:, 0] * 0.5 + 0.5) * 255).round().int().tolist()
    assert values == [1, 2, 11, 12, 21, 22, 31, 32]


def test_audio_features_as_the_processor_computes_them() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2 + 123) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.01 * rng.standard_normal(len(t))
               ).astype(np.float32)
    feats = audio_features(samples)
    assert feats.shape == (128, len(samples) // 160) and feats.dtype == torch.float32
    oracle = WhisperFeatureExtractor(**PREPROCESSOR_CONFIG)
    want = oracle(samples, **Qwen3OmniMoeProcessor.audio_kwargs, return_tensors="np")
    assert int(want["attention_mask"].sum()) == feats.shape[1]
    np.testing.assert_allclose(feats.numpy(), want["input_features"][0], atol=1e-5, rtol=0)
    # The loudest row is the filter centred on 1 kHz: 15 Slaney mels (linear below 1 kHz,
    # 200/3 Hz per mel), centres every (15 + 27 ln 8 / ln 6.4) / 129 mels from row 0 at one
    # step. The token count is the processor's.
    step = (15 + 27 * np.log(8) / np.log(6.4)) / 129
    assert int(feats[:, 50:-50].mean(1).argmax()) == round(15 / step) - 1
    assert audio_output_length(feats.shape[1]) == int(_get_feat_extract_output_lengths(
        torch.tensor(len(samples) // 160)))
    with pytest.raises(ValueError, match="shorter than one"):
        audio_features(np.zeros(100, dtype=np.float32))


def test_video_patches_pad_frames_and_time_the_grid() -> None:
    """Three frames -> two temporal patches, the last frame repeated; a still video's
    patches are the image path's at the video's pixel bounds."""
    rng = np.random.default_rng(3)
    still = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    frames = np.stack([still, still, np.full_like(still, 7)])
    pixel_values, grid, seconds = video_patches(frames, fps=2.0)
    assert seconds == 1.0
    h, w = smart_resize(90, 120, 32, DEFAULT.video_min_pixels, DEFAULT.video_max_pixels)
    assert grid.tolist() == [2, h // 16, w // 16]
    per_step = grid[1] * grid[2]
    video_cfg = dataclasses.replace(DEFAULT, min_pixels=DEFAULT.video_min_pixels,
                                    max_pixels=DEFAULT.video_max_pixels)
    image_rows, image_grid = image_patches(Image.fromarray(still), video_cfg)
    assert image_grid.tolist() == [1, *grid[1:].tolist()]
    torch.testing.assert_close(pixel_values[:per_step], image_rows, atol=0, rtol=0)
    constant = (7 / 255 - 0.5) / 0.5
    torch.testing.assert_close(pixel_values[per_step:],
                               torch.full_like(pixel_values[per_step:], constant),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must be"):
        video_patches(frames[:0], fps=2.0)
