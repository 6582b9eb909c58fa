"""Pi0.5 configuration: lerobot's `config.json` (a `PI05Config`) read into the sizes and
serving knobs the model needs.

lerobot names its two Gemma stacks by variant (`paligemma_variant: gemma_2b`,
`action_expert_variant: gemma_300m`) and keeps the SigLIP tower's sizes in code, so the
real sizes are tables here. A checkpoint of other sizes (the tiny ones of tests and
fixtures) says so in an extra `mstar_sizes` key of its config.json: `{"paligemma": {...},
"action_expert": {...}, "vision": {...}, "vocab_size": n}` with `GemmaSize` and `VisionSize`
field names.

The robot's cameras, state and action widths come from the checkpoint's `input_features` /
`output_features` (`observation.images.<camera>` of type VISUAL, `observation.state`,
`action`); inside the model state and actions are padded to `max_state_dim` /
`max_action_dim` (32).

Presets: `tiny` (CPU tests, seconds), `small` (CPU benchmarks, about ten times tiny),
`base` (lerobot/pi05_base, the dataclass defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mstar.model import config_from_fields

IMAGE_FEATURE_PREFIX = "observation.images."
STATE_FEATURE = "observation.state"
ACTION_FEATURE = "action"


@dataclass(frozen=True)
class GemmaSize:
    """One Gemma stack (openpi's `gemma.Config` fields)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionSize:
    """The SigLIP tower's sizes (Hugging Face `SiglipVisionConfig` names); its image size is
    the config's `image_resolution`, its output projected to the PaliGemma width."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int


#: lerobot's variants (`get_gemma_config`), which are openpi's.
GEMMA_VARIANTS = {
    "gemma_2b": GemmaSize(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1,
                          head_dim=256),
    "gemma_300m": GemmaSize(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1,
                            head_dim=256),
}
#: PaliGemma's SigLIP So400m/14 tower.
SIGLIP_SO400M = VisionSize(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                           num_attention_heads=16, patch_size=14)
#: The cameras of lerobot/pi05_base (`observation.images.<name>`), in prompt order.
BASE_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class Pi05Config:
    """Sizes and serving knobs. `action_horizon` is lerobot's `chunk_size` (a deployment may
    fix another with `model_kwargs`, as openpi's pi05_droid does with 15)."""

    paligemma: GemmaSize = GEMMA_VARIANTS["gemma_2b"]
    action_expert: GemmaSize = GEMMA_VARIANTS["gemma_300m"]
    vision: VisionSize = SIGLIP_SO400M
    vocab_size: int = 257152
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    action_horizon: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_inference_steps: int = 10
    #: the sinusoidal flow-time embedding's period range (openpi's)
    min_period: float = 4e-3
    max_period: float = 4.0
    image_resolution: tuple[int, int] = (224, 224)
    #: the longest prompt (tokens) lerobot tokenizes to
    tokenizer_max_length: int = 200
    cameras: tuple[str, ...] = BASE_CAMERAS
    #: the robot's state and action widths the checkpoint was trained with
    state_dim: int = 32
    action_dim: int = 32
    #: lerobot's `normalization_mapping` (feature type -> IDENTITY | MEAN_STD | MIN_MAX |
    #: QUANTILES | QUANTILE10)
    normalization_mapping: dict[str, str] = field(default_factory=lambda: {
        "VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"})

    @property
    def tokens_per_image(self) -> int:
        side = self.image_resolution[0] // self.vision.patch_size
        return side * side


def from_lerobot(config: dict[str, Any], **overrides: Any) -> Pi05Config:
    """`Pi05Config` from a lerobot `config.json` dict (see the module docstring)."""
    sizes = config.get("mstar_sizes") or {}
    fields: dict[str, Any] = {
        "paligemma": _gemma(sizes.get("paligemma"), config.get("paligemma_variant", "gemma_2b")),
        "action_expert": _gemma(sizes.get("action_expert"),
                                config.get("action_expert_variant", "gemma_300m")),
        "vision": VisionSize(**sizes["vision"]) if "vision" in sizes else SIGLIP_SO400M,
    }
    if "vocab_size" in sizes:
        fields["vocab_size"] = sizes["vocab_size"]
    if "chunk_size" in config:
        fields["action_horizon"] = config["chunk_size"]
    if "image_resolution" in config:
        fields["image_resolution"] = tuple(config["image_resolution"])
    inputs = config.get("input_features") or {}
    cameras = tuple(k.removeprefix(IMAGE_FEATURE_PREFIX) for k, v in inputs.items()
                    if k.startswith(IMAGE_FEATURE_PREFIX) and v.get("type") == "VISUAL")
    if cameras:
        fields["cameras"] = cameras
    if STATE_FEATURE in inputs:
        fields["state_dim"] = inputs[STATE_FEATURE]["shape"][-1]
    outputs = config.get("output_features") or {}
    if ACTION_FEATURE in outputs:
        fields["action_dim"] = outputs[ACTION_FEATURE]["shape"][-1]
    passthrough = {k: v for k, v in config.items() if k not in fields}
    return config_from_fields(Pi05Config, passthrough, **(fields | overrides))


def _gemma(sizes: dict[str, int] | None, variant: str) -> GemmaSize:
    if sizes:
        return GemmaSize(**sizes)
    if variant not in GEMMA_VARIANTS:
        raise ValueError(f"unknown Gemma variant {variant!r}; known: {sorted(GEMMA_VARIANTS)} "
                         "(or give the sizes in config.json's mstar_sizes)")
    return GEMMA_VARIANTS[variant]


def sizes_entry(config: Pi05Config) -> dict[str, Any]:
    """The `mstar_sizes` key a checkpoint of `config`'s sizes writes into config.json."""
    return {"paligemma": dataclasses.asdict(config.paligemma),
            "action_expert": dataclasses.asdict(config.action_expert),
            "vision": dataclasses.asdict(config.vision), "vocab_size": config.vocab_size}


_TINY_GEMMA = dict(depth=2, num_heads=8, num_kv_heads=1, head_dim=16)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "paligemma": GemmaSize(width=64, mlp_dim=128, **_TINY_GEMMA),
        "action_expert": GemmaSize(width=32, mlp_dim=64, **_TINY_GEMMA),
        "vision": VisionSize(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, patch_size=14),
        "vocab_size": 1024, "image_resolution": (56, 56),
    },
    "small": {
        "paligemma": GemmaSize(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1,
                               head_dim=32),
        "action_expert": GemmaSize(width=128, depth=4, mlp_dim=512, num_heads=8,
                                   num_kv_heads=1, head_dim=32),
        "vision": VisionSize(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, patch_size=14),
        "vocab_size": 1024, "image_resolution": (112, 112),
    },
    "base": {},
}
