"""The image transforms BAGEL applies before its encoders (the authors' `ImageTransform`):
resize so the long edge is at most `max_size` and the short edge at least `min_size`, both a
multiple of `stride` and the area within `max_pixels`; then [0, 1] -> [-1, 1].

The ViT side is ImageTransform(980, 224, 14), the VAE side ImageTransform(1024, 512, 16).
Resizing is Pillow's bicubic filter, what torchvision's resize runs on a Pillow image, so
the pixels are the authors'. Note the authors' inferencer resizes an input image with the
VAE rule first and hands that to both transforms.
"""

from __future__ import annotations

import torch
from PIL import Image

#: The authors' default area bound: 9 × 1024 patches of 14 × 14 pixels.
MAX_PIXELS = 14 * 14 * 9 * 1024


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparent pixels composited over white (the authors' `pil_img2rgb`)."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    """Both sides scaled, rounded, then rounded to a multiple of `stride` (at least one)."""
    def fit(side: float) -> int:
        return max(stride, int(round(round(side) / stride) * stride))
    return fit(width * scale), fit(height * scale)


def resized_size(width: int, height: int, max_size: int, min_size: int, stride: int,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) the image is resized to: scale to the edge bounds (the short-edge
    minimum wins over the long-edge maximum), then shrink again if over `max_pixels`, then
    if the long edge still exceeds `max_size`; each step rounds to multiples of `stride`."""
    scale = max(min(max_size / max(width, height), 1.0), min_size / min(width, height))
    width, height = _scaled(width, height, scale, stride)
    if width * height > max_pixels:
        width, height = _scaled(width, height, max_pixels / (width * height), stride)
    if max(width, height) > max_size:
        width, height = _scaled(width, height, max_size / max(width, height), stride)
    return width, height


def image_transform(image: Image.Image, max_size: int, min_size: int, stride: int,
                    max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A Pillow image -> float32 [3, H, W] in [-1, 1] (mean = std = 0.5), H and W multiples
    of `stride` by `resized_size`."""
    image = to_rgb(image)
    size = resized_size(*image.size, max_size, min_size, stride, max_pixels)
    image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(size[1], size[0], 3).permute(2, 0, 1).float() / 255.0
    return (pixels - 0.5) / 0.5


def vit_transform(image: Image.Image) -> torch.Tensor:
    """The ViT's input: ImageTransform(980, 224, 14), patches of 14 pixels."""
    return image_transform(image, 980, 224, 14)


def vae_transform(image: Image.Image) -> torch.Tensor:
    """The VAE's input: ImageTransform(1024, 512, 16), 8× downsampling then 2 × 2 patches."""
    return image_transform(image, 1024, 512, 16)
