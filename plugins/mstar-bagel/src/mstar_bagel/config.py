"""BAGEL configuration: the LLM (`llm_config.json`), the ViT (`vit_config.json`), the FLUX
VAE (fixed sizes; the checkpoint has no config for it) and the fields that join them
(`config.json`), plus server-fixed serving knobs (image sizes, image transforms).

Presets: `tiny` (CPU tests: a few layers, a 4×-downsampling VAE, 32–48 px images), `small`
(CPU benchmarks), `7b` (the real sizes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mstar.model import config_from_fields
from mstar_bagel.autoencoder import AEConfig
from mstar_bagel.llm import LLMConfig
from mstar_bagel.vit import VIT_PRESETS, ViTConfig

#: The authors' demo sizes (1:1, 4:3, 3:4, 16:9, 9:16) as OpenAI's "WxH".
REAL_IMAGE_SIZES = ["1024x1024", "1024x768", "768x1024", "1024x576", "576x1024"]


def _sub(cls: type, value: Any) -> Any:
    """A sub-config as given, or from a dict of checkpoint fields (unknown keys ignored)."""
    return value if isinstance(value, cls) else config_from_fields(cls, value)


@dataclass
class BagelConfig:
    """Real BAGEL-7B-MoT values as defaults."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=lambda: VIT_PRESETS["bagel-7b"])
    vae: AEConfig = field(default_factory=AEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    #: Output sizes a request may ask for ("WxH"); the first is the default.
    image_sizes: list[str] = field(default_factory=lambda: list(REAL_IMAGE_SIZES))
    #: The authors' image transforms: [longest side max, shortest side min, stride].
    vae_transform: list[int] = field(default_factory=lambda: [1024, 512, 16])
    vit_transform: list[int] = field(default_factory=lambda: [980, 224, 14])

    def __post_init__(self) -> None:
        self.llm = _sub(LLMConfig, self.llm)
        self.vit = _sub(ViTConfig, self.vit)
        self.vae = _sub(AEConfig, self.vae)
        for size in self.image_sizes:
            w, h = _parse_size(size)
            if w % self.latent_downsample or h % self.latent_downsample:
                raise ValueError(f"image_sizes: {size} is not a multiple of the latent "
                                 f"downsampling {self.latent_downsample}")
            if max(w, h) > self.max_latent_size * self.latent_downsample:
                raise ValueError(f"image_sizes: {size} exceeds the latent position table "
                                 f"({self.max_latent_size * self.latent_downsample} px)")

    @property
    def latent_dim(self) -> int:
        """Values per latent token: a patch of p×p latent pixels of z channels."""
        return self.latent_patch_size ** 2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Image pixels per latent token along a side (VAE downsampling × patch)."""
        return self.vae.downsample * self.latent_patch_size

    def image_size_pairs(self) -> list[tuple[int, int]]:
        return [_parse_size(s) for s in self.image_sizes]

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> BagelConfig:
        """From config.json's fields and the `llm_config.json` / `vit_config.json` files (or
        config.json's nested `llm_config` / `vit_config`). The authors' loader drops the
        ViT's last layer (`num_hidden_layers -= 1`): BAGEL reads the penultimate layer."""
        llm = checkpoint.get("llm_config.json") or checkpoint.get("llm_config") or {}
        vit = checkpoint.get("vit_config.json") or checkpoint.get("vit_config")
        names = {f.name for f in dataclasses.fields(cls)} - {"llm", "vit", "vae"}
        top = {k: v for k, v in checkpoint.items() if k in names}
        return cls(llm=_sub(LLMConfig, llm),
                   vit=ViTConfig.from_vit_config_json(vit) if vit else VIT_PRESETS["bagel-7b"],
                   vae=_sub(AEConfig, checkpoint.get("vae_config") or {}), **top)


def _parse_size(size: str) -> tuple[int, int]:
    w, _, h = size.partition("x")
    return int(w), int(h)


#: The tiny vocabulary holds the packaged tokenizer's 372 tokens.
_TINY_LLM = dataclasses.replace(LLMConfig.tiny(), vocab_size=512)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(llm=_TINY_LLM, vit=VIT_PRESETS["tiny"], vae=AEConfig.tiny(),
                 max_latent_size=8, vit_max_num_patch_per_side=4,
                 image_sizes=["32x32", "48x32", "32x48"], vae_transform=[48, 32, 8],
                 vit_transform=[28, 14, 7]),
    "small": dict(llm=dataclasses.replace(_TINY_LLM, hidden_size=256, intermediate_size=768,
                                          num_hidden_layers=6, num_attention_heads=8,
                                          num_key_value_heads=4),
                  vit=VIT_PRESETS["tiny"], vae=AEConfig.tiny(), max_latent_size=16,
                  vit_max_num_patch_per_side=4, image_sizes=["64x64", "96x64", "64x96"],
                  vae_transform=[96, 64, 8], vit_transform=[28, 14, 7]),
    "7b": {},
}
PRESET_MAX_SEQ_LEN = {"tiny": 2048, "small": 4096}
