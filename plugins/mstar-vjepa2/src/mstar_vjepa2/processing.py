"""Video preprocessing as Hugging Face's `VJEPA2VideoProcessor` does it, without torchvision.

Each frame: bilinear (antialiased) resize of the shortest edge to int(crop·256/224) (292
for 256; the other edge int(292·long/short)), centre crop to crop×crop (top/left offset
int((size - crop)/2)), /255, ImageNet mean/std. uint8 frames are resized in uint8 as
torchvision does (its rounding), float frames (0..255) in float.

Frames: the clip keeps the largest multiple of `tubelet_size` frames (the tubelet
convolution drops a trailing remainder anyway, as the hub model does); fewer frames than
one tubelet is an error.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mstar.media import Video
from mstar_vjepa2.config import VJepa2Config

#: `transformers.image_utils.IMAGENET_DEFAULT_MEAN` / `_STD`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_shortest_edge(crop_size: int) -> int:
    """The processor's `size["shortest_edge"]` for a crop: int(crop · 256 / 224)."""
    return int(crop_size * 256 / 224)


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter edge to `shortest_edge`, keeping aspect
    (transformers' `get_resize_output_image_size`: the longer edge truncated)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def preprocess_video(video: Video | np.ndarray | torch.Tensor, cfg: VJepa2Config
                     ) -> torch.Tensor:
    """Frames -> pixel_values `[T', 3, crop, crop]` float32, T' the largest multiple of
    `tubelet_size` <= T. Frames are a decoded `Video` or an array/tensor `[T, H, W, 3]`
    (uint8, or float in 0..255: the processor's input) or `[T, 3, H, W]` float in [0, 1]
    (a tensor of images, as torchvision keeps them). ValueError for fewer than
    `tubelet_size` frames or another shape."""
    frames = torch.as_tensor(video.frames if isinstance(video, Video) else video)
    if frames.dim() == 4 and frames.shape[-1] == 3:
        pixels = frames.permute(0, 3, 1, 2)
        if pixels.dtype != torch.uint8:
            pixels = pixels.float()
    elif frames.dim() == 4 and frames.shape[1] == 3 and frames.is_floating_point():
        pixels = frames.float() * 255.0
    else:
        raise ValueError(f"video frames must be [T, H, W, 3] RGB (or [T, 3, H, W] float in "
                         f"[0, 1]), got {list(frames.shape)} {frames.dtype}")
    if 0 in pixels.shape[2:]:
        raise ValueError(f"video frames are empty: {list(frames.shape)}")
    if pixels.shape[0] < cfg.tubelet_size:
        raise ValueError(f"the video has {pixels.shape[0]} frame(s); V-JEPA 2 needs at least "
                         f"{cfg.tubelet_size} (one tubelet)")
    pixels = pixels[:pixels.shape[0] // cfg.tubelet_size * cfg.tubelet_size]
    crop = cfg.crop_size
    h, w = resized_size(pixels.shape[2], pixels.shape[3], resize_shortest_edge(crop))
    pixels = F.interpolate(pixels, size=(h, w), mode="bilinear", antialias=True,
                           align_corners=False)
    top, left = int((h - crop) / 2.0), int((w - crop) / 2.0)
    pixels = pixels[:, :, top:top + crop, left:left + crop].float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std
