"""Orpheus configuration: the Llama-3.2 speech LM (fields of its config.json), Orpheus'
special tokens and code layout, and the SNAC codec's config (its own config.json).

Presets: `tiny` (CPU tests: a few layers, the real 156,940-token vocabulary so every special
and audio token id is real, a tiny SNAC), `small` (CPU benchmarks), `3b` (the real sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Voices of the authors' README plus `julia`, which their package also knows.
VOICES = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe", "julia")
DEFAULT_VOICE = "tara"

START_OF_HUMAN = 128259
END_OF_TEXT = 128009
END_OF_HUMAN = 128260
START_OF_AI = 128261
START_OF_SPEECH = 128257
END_OF_SPEECH = 128258  # the stop token
#: The prompt is [START_OF_HUMAN] + tokens("{voice}: {text}") + PROMPT_END.
PROMPT_END = (END_OF_TEXT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH)
CUSTOM_TOKEN_BASE = 128256  # id of <custom_token_0>
AUDIO_TOKEN_BASE = CUSTOM_TOKEN_BASE + 10  # id of code 0 at frame position 0
CODES_PER_FRAME = 7
CODEBOOK_SIZE = 4096
SAMPLES_PER_FRAME = 2048  # SNAC 24 kHz: hop 512 x 4 level-0 steps


@dataclass
class SnacConfig:
    """The fields of hubertsiuzdak/snac_24khz's config.json (real values as defaults)."""

    sampling_rate: int = 24000
    encoder_dim: int = 48
    encoder_rates: list[int] = field(default_factory=lambda: [2, 4, 8, 8])
    latent_dim: int | None = None
    decoder_dim: int = 1024
    decoder_rates: list[int] = field(default_factory=lambda: [8, 8, 4, 2])
    attn_window_size: int | None = None
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: list[int] = field(default_factory=lambda: [4, 2, 1])
    noise: bool = True
    depthwise: bool = True


@dataclass
class OrpheusConfig:
    """The LM's config.json fields (Llama-3.2-3B values as defaults) and the codec's."""

    vocab_size: int = 156940
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: {
        "rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    tie_word_embeddings: bool = True  # Llama-3.2-3B's head is its embedding
    snac: SnacConfig = field(default_factory=SnacConfig)

    def __post_init__(self) -> None:
        if isinstance(self.snac, dict):
            self.snac = SnacConfig(**self.snac)


TINY_SNAC = dict(encoder_dim=8, encoder_rates=[2, 4, 8, 8], decoder_dim=32,
                 decoder_rates=[8, 8, 4, 2], codebook_size=4096, codebook_dim=4,
                 vq_strides=[4, 2, 1], noise=True, depthwise=True)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 snac=SnacConfig(**TINY_SNAC)),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                  snac=SnacConfig(**{**TINY_SNAC, "decoder_dim": 64})),
    "3b": {},
}
#: The small presets' context: their packaged YAMLs carry the real model's 131072 tokens.
#: A tiny Orpheus speaks its default 1200 tokens within 2048.
PRESET_MAX_SEQ_LEN = {"tiny": 2048, "small": 4096}
