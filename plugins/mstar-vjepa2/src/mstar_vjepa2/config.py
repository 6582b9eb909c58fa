"""V-JEPA 2 configuration: the Hugging Face `VJEPA2Config` fields the encoder, the masked
predictor and the preprocessing need, read from a hub `config.json` by name.

The dataclass defaults are `facebook/vjepa2-vitl-fpc64-256` (the hub's default config);
its siblings (vith, vitg, 384 px) differ only in these fields, so every hub checkpoint
builds from its own config.json. `frames_per_clip` is what the model was trained with; a
clip of any multiple of `tubelet_size` frames encodes (RoPE positions extrapolate).

Presets: `tiny` (CPU tests: a clip encodes in milliseconds), `small` (CPU benchmarks,
about ten times tiny), `vitl` (the hub checkpoint's sizes, the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mstar.model import config_from_fields


@dataclass(frozen=True)
class VJepa2Config:
    """Sizes with `VJEPA2Config`'s names (`pred_*`: the masked predictor)."""

    patch_size: int = 16
    crop_size: int = 256
    frames_per_clip: int = 64
    tubelet_size: int = 2
    in_chans: int = 3
    hidden_size: int = 1024
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    pred_hidden_size: int = 384
    pred_num_attention_heads: int = 12
    pred_num_hidden_layers: int = 12
    pred_num_mask_tokens: int = 10
    pred_mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for width, heads, what in ((self.hidden_size, self.num_attention_heads, "hidden_size"),
                                   (self.pred_hidden_size, self.pred_num_attention_heads,
                                    "pred_hidden_size")):
            if width % heads:
                raise ValueError(f"{what}={width} is not a multiple of its {heads} heads")
        if self.crop_size % self.patch_size:
            raise ValueError(f"crop_size={self.crop_size} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side of a `crop_size` frame: the grid token indices refer to."""
        return self.crop_size // self.patch_size

    @property
    def tokens_per_tubelet(self) -> int:
        return self.grid_size * self.grid_size


def from_hub(config: dict[str, Any], **overrides: Any) -> VJepa2Config:
    """`VJepa2Config` from a hub `config.json` dict (other keys are ignored). The hub may
    write `patch_size` as a pair; V-JEPA 2's patches are square."""
    fields = dict(config)
    patch = fields.get("patch_size")
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"patch_size={patch}: only square patches are supported")
        fields["patch_size"] = patch[0]
    return config_from_fields(VJepa2Config, fields, **overrides)


_TINY_HEADS = dict(num_attention_heads=2, pred_num_attention_heads=2)
PRESETS: dict[str, dict[str, Any]] = {
    # head_dim 16: three RoPE slices of 4 and 4 dims left unrotated, as in vitl (64 = 3·20 + 4)
    "tiny": dict(patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2,
                 hidden_size=32, num_hidden_layers=2, pred_hidden_size=32,
                 pred_num_hidden_layers=2, pred_num_mask_tokens=2, **_TINY_HEADS),
    "small": dict(patch_size=8, crop_size=64, frames_per_clip=8, tubelet_size=2,
                  hidden_size=128, num_attention_heads=4, num_hidden_layers=4,
                  pred_hidden_size=64, pred_num_attention_heads=4, pred_num_hidden_layers=2,
                  pred_num_mask_tokens=2),
    "vitl": {},
}
