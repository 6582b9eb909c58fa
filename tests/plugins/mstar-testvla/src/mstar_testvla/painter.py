"""testvla's images (mode "image"): a denoised action chunk rendered as an RGB picture.

Not a generative model: what the image routes need from a test model is an image that
depends on everything the chunk depends on (the prompt, an input image, each image's own
noise) and on nothing else. So a fixed projection maps the chunk onto a `GRID`×`GRID`
colour grid, which is scaled (nearest) to the requested size and encoded as PNG.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: The (width, height) sizes testvla paints; no size given: the first.
IMAGE_SIZES = ((32, 32), (64, 48))
#: The most images one request asks for (`n`).
MAX_IMAGES = 4
GRID = 4


@functools.cache
def _projection(inputs: int) -> torch.Tensor:
    """The fixed [inputs, 3·GRID²] projection (seeded: the same in every process)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(inputs, 3 * GRID * GRID, generator=generator) / inputs ** 0.5


def paint(chunk: torch.Tensor, width: int, height: int) -> bytes:
    """The PNG of `chunk` (any shape) as a `width`×`height` RGB image."""
    from mstar.media.image import png_bytes  # postprocess runs where media is loaded

    x = torch.as_tensor(chunk).detach().float().reshape(-1).cpu()
    colours = torch.sigmoid(x @ _projection(x.numel())).reshape(1, 3, GRID, GRID)
    pixels = F.interpolate(colours, size=(height, width), mode="nearest")[0]
    return png_bytes((pixels.permute(1, 2, 0) * 255).round().to(torch.uint8))


def size_error(width: int | None, height: int | None) -> str | None:
    """Why (`width`, `height`) is not a size testvla paints, or None when it is (both None:
    the default)."""
    if width is None and height is None or (width, height) in IMAGE_SIZES:
        return None
    allowed = ", ".join(f"{w}x{h}" for w, h in IMAGE_SIZES)
    shown = "x".join("?" if side is None else str(side) for side in (width, height))
    return f"size {shown} is not supported; allowed sizes: {allowed}"
