"""What `Qwen3OmniMoeProcessor` does to a request's media before the encoders, host side
(the data worker; numpy, torch and Pillow only).

- Audio: 16 kHz mono -> log-mel [128, frames] with transformers' `WhisperFeatureExtractor`
  itself, as the processor calls it (one clip, `padding=True`, `truncation=False`): 100
  frames a second, `len(samples) // hop_length` of them, no 30-second cap.
- Images (the `Qwen2VLImageProcessor` steps, written here because transformers' default
  version needs torchvision): `smart_resize` to multiples of patch·merge within
  [min_pixels, max_pixels] keeping the aspect ratio, Pillow bicubic resize of the uint8
  RGB image, rescale by 1/255, normalise with the processor's mean and std, then the patch
  rows (`_patch_rows`). Tested equal to transformers' `Qwen2VLImageProcessorPil`.
- Video (the `Qwen2VLVideoProcessor` steps): every frame resized as an image, within the
  processor's per-frame video bounds (`Qwen3OmniMoeProcessor.videos_kwargs`: 128 to 768
  tokens' worth of pixels); the frame count padded to a multiple of `temporal_patch_size`
  by repeating the last frame; each temporal patch lasts `temporal_patch_size / fps`
  seconds. transformers resizes video frames with torchvision's bicubic, here Pillow's
  (torchvision is not a dependency): the two differ by interpolation rounding only.
  Frames arrive already sampled (`mstar.media.load_video` at the request's fps).

The constants are the checkpoint's `preprocessor_config.json` (`ProcessorConfig`, same
field names; `config_from_fields` reads the file's dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ProcessorConfig:
    """Qwen3-Omni-30B-A3B's `preprocessor_config.json` (its field names and values), plus
    the processor class's per-frame pixel bounds for video."""

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    n_samples: int = 4_800_000
    dither: float = 0.0
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12_845_056
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one merged token covers factor² pixels."""
        return self.patch_size * self.merge_size


DEFAULT = ProcessorConfig()


@lru_cache(maxsize=4)
def _feature_extractor(cfg: ProcessorConfig):  # noqa: ANN202 (transformers type)
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=cfg.feature_size, sampling_rate=cfg.sampling_rate,
        hop_length=cfg.hop_length, chunk_length=cfg.n_samples // cfg.sampling_rate,
        n_fft=cfg.n_fft, dither=cfg.dither, return_attention_mask=True)


def audio_features(samples: np.ndarray, cfg: ProcessorConfig = DEFAULT) -> torch.Tensor:
    """Mono float samples at `cfg.sampling_rate` -> log-mel features [feature_size,
    len // hop_length] float32 (a clip shorter than one hop gives no frames: ValueError)."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if len(samples) < cfg.hop_length:
        raise ValueError(f"audio of {len(samples)} samples is shorter than one "
                         f"{cfg.hop_length}-sample frame")
    out = _feature_extractor(cfg)(samples, sampling_rate=cfg.sampling_rate, padding=True,
                                  truncation=False, return_attention_mask=True,
                                  return_tensors="np")
    frames = int(out["attention_mask"][0].sum())
    return torch.from_numpy(np.ascontiguousarray(out["input_features"][0, :, :frames]))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled (keeping the aspect ratio)
    into [min_pixels, max_pixels] when rounding left them outside."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image's aspect ratio must be under 200, got {width}x{height}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _normalised(image: Image.Image, size: tuple[int, int], cfg: ProcessorConfig
                ) -> np.ndarray:
    """RGB image resized to `size` (h, w), rescaled and normalised: float32 [3, h, w]."""
    rgb = image.convert("RGB")
    if (rgb.height, rgb.width) != size:
        rgb = rgb.resize((size[1], size[0]), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(rgb).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


def _patch_rows(frames: np.ndarray, cfg: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [T, C, H, W] (T a multiple of temporal_patch_size) -> (pixel_values
    [t·h·w, C·T·P·P], grid_thw [t, h, w]): rows in spatial-merge-block order per temporal
    step, each row (channel, frame, row, col) as the Conv3d's weight."""
    n, c, height, width = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    t, h, w = n // tp, height // p, width // p
    x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    # -> (t, block row, block col, row in block, col in block, C, frame, py, px)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = np.ascontiguousarray(x.reshape(t * h * w, c * tp * p * p))
    return torch.from_numpy(rows), torch.tensor([t, h, w], dtype=torch.long)


def image_patches(image: Image.Image, cfg: ProcessorConfig = DEFAULT
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Pillow image -> (pixel_values [patches, C·T·P·P] float32, grid_thw [3] long); the
    image is its own temporal partner (repeated `temporal_patch_size` times)."""
    size = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    frame = _normalised(image, size, cfg)
    return _patch_rows(np.repeat(frame[None], cfg.temporal_patch_size, axis=0), cfg)


def video_patches(frames: np.ndarray, fps: float, cfg: ProcessorConfig = DEFAULT
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sampled RGB frames uint8 [T, H, W, 3] taken at `fps` -> (pixel_values, grid_thw,
    seconds per temporal patch)."""
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T>0, H, W, 3], got {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    _, height, width, _ = frames.shape
    size = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)
    out = np.stack([_normalised(Image.fromarray(f), size, cfg) for f in frames])
    if pad := -len(out) % cfg.temporal_patch_size:
        out = np.concatenate([out, np.repeat(out[-1:], pad, axis=0)])
    pixel_values, grid_thw = _patch_rows(out, cfg)
    return pixel_values, grid_thw, cfg.temporal_patch_size / fps


__all__ = ["DEFAULT", "ProcessorConfig", "audio_features", "image_patches", "smart_resize",
           "video_patches"]
