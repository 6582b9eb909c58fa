"""TestVLA's configuration: one dataclass, named like the checkpoint's `config.json`.

Field names follow Hugging Face (`num_hidden_layers`, `num_attention_heads`, …) so the
checkpoint's config.json loads by name (`Model.config_from_checkpoint`) and the text expert
is a plain Llama config. Presets: `tiny` (CPU tests) and `small` (CPU benchmarks: a ~58 M
parameter Llama text expert with a real-sized 32000-token vocabulary, of which the byte
tokenizer uses the first 262 ids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TestVLAConfig:
    """Dimensions of every part. Expert 0 is the text/frame expert (Llama), expert 1 the
    half-width media/action expert (BAGEL's `_moe_gen` stack); both share the attention
    layers' heads and head dim so they read and write the same KV cache."""

    __test__ = False  # not a pytest test class despite its name

    vocab_size: int = 264
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Expert 1 (media and actions).
    expert_hidden: int = 32
    expert_intermediate: int = 64
    #: Frequency pairs per position axis (temporal, height, width); sums to head_dim / 2.
    mrope_sections: tuple[int, ...] = (4, 2, 2)
    #: `mid_hidden` is expert 0's hidden state entering this layer (streamed to the consumer).
    mid_layer: int = 2
    # Vision encoder (one pre-norm ViT block).
    patch_size: int = 4
    chat_image_size: int = 16  # chat images are resized to this square (pixels)
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    # Actions (flow matching) and frames (world-model rollout).
    action_dim: int = 4
    action_horizon: int = 4
    frame_dim: int = 8
    frame_tokens: int = 4
    # Consumer (codec-like: code units -> audio samples).
    code_dim: int = 16
    samples_per_unit: int = 4
    consumer_kernel: int = 3
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        # config.json stores lists; keep a hashable tuple.
        object.__setattr__(self, "mrope_sections", tuple(self.mrope_sections))
        checks = [
            (sum(self.mrope_sections) == self.head_dim // 2,
             f"mrope_sections {self.mrope_sections} must sum to head_dim/2 = {self.head_dim // 2}"),
            (len(self.mrope_sections) == 3, "mrope_sections needs 3 axes (t, h, w)"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (0 <= self.mid_layer <= self.num_hidden_layers,
             f"mid_layer must be in [0, {self.num_hidden_layers}]"),
            (self.vision_hidden % self.vision_heads == 0,
             "vision_hidden must be a multiple of vision_heads"),
            (self.vision_hidden % 4 == 0, "vision_hidden must be a multiple of 4 (2-D sincos)"),
            (self.expert_hidden % 2 == 0, "expert_hidden must be even (time embedding)"),
            (self.consumer_kernel % 2 == 1, "consumer_kernel must be odd"),
            (self.vocab_size >= 262, "vocab_size must hold the 256 bytes and 6 special ids"),
        ]
        side = int(round(self.frame_tokens ** 0.5))
        checks.append((side * side == self.frame_tokens, "frame_tokens must be a square grid"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TestVLAConfig: {message}")

    @property
    def frame_grid(self) -> tuple[int, int]:
        side = int(round(self.frame_tokens ** 0.5))
        return side, side

    def to_json_dict(self) -> dict[str, Any]:
        """config.json content: every field, plus the Llama fields HF tools look for."""
        data = dataclasses.asdict(self)
        data["mrope_sections"] = list(self.mrope_sections)
        data.update(model_type="testvla", architectures=["TestVLAForActionGeneration"],
                    hidden_act="silu", tie_word_embeddings=False)
        return data


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, intermediate_size=1536, expert_hidden=256,
        expert_intermediate=768, mrope_sections=(16, 8, 8), mid_layer=4, vision_hidden=128,
        vision_heads=4, vision_intermediate=256, code_dim=64,
    ),
}
