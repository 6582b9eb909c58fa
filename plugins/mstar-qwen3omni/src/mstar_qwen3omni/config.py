"""Qwen3-Omni configuration: the checkpoint's `config.json` as it is laid out, plus the
serving knobs no checkpoint holds.

The checkpoint nests one config per part (`thinker_config.{text_config, audio_config,
vision_config}`, `talker_config.{text_config, code_predictor_config}`, `code2wav_config`) and
keeps the chat-token ids at the top level. `Qwen3OmniConfig` keeps those sub-dicts as they
are and builds each module's own dataclass from its dict on demand (`thinker_text()`,
`audio_encoder()`, ... via `config_from_fields`, the module's field names being the
checkpoint's), so a field one module adds never needs a change here.

Presets: `tiny` (CPU tests: two layers everywhere, hidden 32, 4 experts top-2, a 64-code
codebook, the packaged tiny tokenizer's vocabulary and ids), `small` (CPU benchmarks, about
ten times tiny), `30b-a3b` (Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json values, the
dataclass defaults).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mstar.model import config_from_fields

#: Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json, the fields that differ from nothing
#: (model_type, dtype and bookkeeping keys left out).
_REAL_ROPE = {"rope_type": "default", "rope_theta": 1000000, "mrope_section": [24, 20, 20],
              "interleaved": True, "mrope_interleaved": True}
REAL_THINKER = {
    "audio_config": {
        "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120, "d_model": 1280, "activation_function": "gelu",
        "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800,
        "conv_chunksize": 500, "downsample_hidden_size": 480, "output_dim": 2048,
        "scale_embedding": False},
    "vision_config": {
        "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 4304, "num_heads": 16, "in_channels": 3, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
    "text_config": {
        "vocab_size": 152064, "hidden_size": 2048, "intermediate_size": 768,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "attention_bias": False,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
        "rope_parameters": _REAL_ROPE, "rope_scaling": _REAL_ROPE, "rope_theta": 1000000},
    "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
    "audio_start_token_id": 151669, "audio_end_token_id": 151670,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "position_id_per_seconds": 13, "seconds_per_chunk": 2, "user_token_id": 872,
}
REAL_TALKER = {
    "text_config": {
        "vocab_size": 3072, "hidden_size": 1024, "intermediate_size": 2048,
        "moe_intermediate_size": 384, "shared_expert_intermediate_size": 768,
        "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 2,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6, "attention_bias": False, "num_experts": 128,
        "num_experts_per_tok": 6, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "tie_word_embeddings": False,
        "rope_parameters": {k: v for k, v in _REAL_ROPE.items() if k != "mrope_interleaved"},
        "rope_scaling": {k: v for k, v in _REAL_ROPE.items() if k != "mrope_interleaved"},
        "rope_theta": 1000000},
    "code_predictor_config": {
        "vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 5, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "attention_bias": False, "num_code_groups": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000},
        "rope_theta": 1000000},
    "num_code_groups": 16, "thinker_hidden_size": 2048, "accept_hidden_layer": 24,
    "codec_eos_token_id": 2150, "codec_nothink_id": 2155, "codec_think_bos_id": 2156,
    "codec_think_eos_id": 2157, "codec_pad_id": 2148, "codec_bos_id": 2149,
    "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
    "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
    "audio_start_token_id": 151669, "audio_end_token_id": 151670,
    "vision_start_token_id": 151652, "position_id_per_seconds": 13, "seconds_per_chunk": 2,
    "spatial_merge_size": 2,
}
REAL_CODE2WAV = {
    "codebook_size": 2048, "hidden_size": 1024, "num_hidden_layers": 8,
    "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 3072,
    "max_position_embeddings": 8000, "sliding_window": 72, "num_quantizers": 16,
    "num_semantic_quantizers": 1, "semantic_codebook_size": 4096, "codebook_dim": 512,
    "vector_quantization_hidden_dimension": 512, "upsample_rates": [8, 5, 4, 3],
    "upsampling_ratios": [2, 2], "decoder_dim": 1536, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "layer_scale_initial_scale": 0.01, "attention_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000}, "rope_theta": 10000,
}
#: The sample rate of Code2Wav's speech and of the audio encoder's input.
OUTPUT_SAMPLE_RATE = 24000
INPUT_SAMPLE_RATE = 16000


@dataclass
class Qwen3OmniConfig:
    """`config.json` of Qwen3-Omni (sub-configs as the checkpoint nests them) and the
    serving knobs: Code2Wav's streaming windows in codec frames (`codec_chunk_frames` with
    `codec_left_context_frames` of left context, cut as the reference's
    `chunked_decode(codes, chunk, left)` cuts; 25 and 25 as vLLM-Omni streams, not
    `generate`'s one-shot 300, whose next packet would come 24 s of speech after the
    first; and a short `codec_first_chunk_frames` for the first packet) and the bound
    on a Talker that never samples its end code (`talker_frames_per_token` codec frames per
    Thinker token, `talker_min_frames` at least)."""

    thinker_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(REAL_THINKER))
    talker_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(REAL_TALKER))
    code2wav_config: dict[str, Any] = field(
        default_factory=lambda: copy.deepcopy(REAL_CODE2WAV))
    enable_audio_output: bool = True
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091
    codec_chunk_frames: int = 25
    codec_left_context_frames: int = 25
    codec_first_chunk_frames: int = 10
    talker_frames_per_token: int = 8
    talker_min_frames: int = 64

    def __post_init__(self) -> None:
        for name in ("codec_chunk_frames", "codec_first_chunk_frames", "talker_min_frames",
                     "talker_frames_per_token"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.codec_left_context_frames < 0:
            raise ValueError("codec_left_context_frames must be >= 0")

    # -- ids the host side reads -----------------------------------------------------------
    @property
    def audio_token_id(self) -> int:
        return int(self.thinker_config["audio_token_id"])

    @property
    def image_token_id(self) -> int:
        return int(self.thinker_config["image_token_id"])

    @property
    def video_token_id(self) -> int:
        return int(self.thinker_config["video_token_id"])

    @property
    def audio_start_token_id(self) -> int:
        return int(self.thinker_config["audio_start_token_id"])

    @property
    def audio_end_token_id(self) -> int:
        return int(self.thinker_config.get("audio_end_token_id", self.audio_start_token_id + 1))

    @property
    def vision_start_token_id(self) -> int:
        return int(self.thinker_config["vision_start_token_id"])

    @property
    def vision_end_token_id(self) -> int:
        return int(self.thinker_config.get("vision_end_token_id",
                                           self.vision_start_token_id + 1))

    @property
    def position_id_per_seconds(self) -> float:
        return self.thinker_config.get("position_id_per_seconds", 25)

    @property
    def spatial_merge_size(self) -> int:
        return int(self.thinker_config["vision_config"].get("spatial_merge_size", 2))

    @property
    def audio_n_window(self) -> int:
        return int(self.thinker_config["audio_config"].get("n_window", 50))

    @property
    def speakers(self) -> dict[str, int]:
        """Voice name (lower case) -> the Talker's speaker code."""
        return {k.lower(): int(v) for k, v in (self.talker_config.get("speaker_id")
                                                or {}).items()}

    @property
    def default_speaker(self) -> str:
        """HF `generate`'s default voice when the checkpoint has it, else its first."""
        return "ethan" if "ethan" in self.speakers else next(iter(self.speakers))

    @property
    def codec_eos_token_id(self) -> int:
        return int(self.talker_config["codec_eos_token_id"])

    @property
    def samples_per_frame(self) -> int:
        """Code2Wav's output samples per codec frame (its total upsampling)."""
        c = self.code2wav_config
        total = 1
        for rate in (*c.get("upsample_rates", (8, 5, 4, 3)),
                     *c.get("upsampling_ratios", (2, 2))):
            total *= int(rate)
        return total

    # -- the modules' own configs ------------------------------------------------------------
    def thinker_text(self) -> Any:
        from mstar_qwen3omni.thinker import ThinkerTextConfig

        return config_from_fields(ThinkerTextConfig, self.thinker_config["text_config"])

    def audio_encoder(self) -> Any:
        from mstar_qwen3omni.audio_encoder import AudioEncoderConfig

        return config_from_fields(AudioEncoderConfig, self.thinker_config["audio_config"])

    def vision_encoder(self) -> Any:
        from mstar_qwen3omni.vision_encoder import VisionEncoderConfig

        return config_from_fields(VisionEncoderConfig, self.thinker_config["vision_config"])

    def talker(self) -> Any:
        """The Talker's config (its own nested text and code-predictor configs), with the
        Thinker's vocabulary size and the top-level tts ids it needs."""
        from mstar_qwen3omni.talker import TalkerConfig

        return TalkerConfig.from_fields(
            self.talker_config, thinker_vocab_size=self.thinker_config["text_config"][
                "vocab_size"], tts_bos_token_id=self.tts_bos_token_id,
            tts_eos_token_id=self.tts_eos_token_id, tts_pad_token_id=self.tts_pad_token_id)

    def code2wav(self) -> Any:
        from mstar_qwen3omni.code2wav import Code2WavConfig

        return config_from_fields(Code2WavConfig, self.code2wav_config)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> Qwen3OmniConfig:
        """From a checkpoint's config.json: its sub-dicts and top-level ids; the serving
        knobs keep their defaults."""
        return config_from_fields(cls, checkpoint)

    def hf_dict(self) -> dict[str, Any]:
        """The checkpoint fields, as `Qwen3OmniMoeConfig(**hf_dict())` takes them."""
        names = {f.name for f in dataclasses.fields(self)} - set(SERVING_FIELDS)
        return copy.deepcopy({name: getattr(self, name) for name in sorted(names)})


SERVING_FIELDS = ("codec_chunk_frames", "codec_left_context_frames", "codec_first_chunk_frames",
                  "talker_frames_per_token", "talker_min_frames")


# ------------------------------------------------------------------------------------------
# Presets


#: The packaged tiny tokenizer's special tokens get ids TINY_BASE + their index in
#: `mstar_qwen3omni.tokenizer.SPECIAL_TOKENS`; `tests/test_qwen3omni_config.py` checks it.
TINY_BASE = 400
TINY_IDS = {
    "endoftext": TINY_BASE, "im_start": TINY_BASE + 1, "im_end": TINY_BASE + 2,
    "vision_start": TINY_BASE + 3, "vision_end": TINY_BASE + 4, "image_pad": TINY_BASE + 5,
    "video_pad": TINY_BASE + 6, "audio_start": TINY_BASE + 7, "audio_end": TINY_BASE + 8,
    "tts_pad": TINY_BASE + 9, "tts_bos": TINY_BASE + 10, "tts_eos": TINY_BASE + 11,
    "tts_bos_single": TINY_BASE + 12, "audio_pad": TINY_BASE + 13,
}
#: Ids of the role words in the tiny tokenizer's learned vocabulary (checked by the test).
TINY_ROLE_IDS = {"system": 268, "user": 264, "assistant": 270}
TINY_VOCAB = 416


def _media_ids(ids: dict[str, int]) -> dict[str, int]:
    return {"audio_token_id": ids["audio_pad"], "image_token_id": ids["image_pad"],
            "video_token_id": ids["video_pad"], "audio_start_token_id": ids["audio_start"],
            "audio_end_token_id": ids["audio_end"], "vision_start_token_id": ids["vision_start"],
            "vision_end_token_id": ids["vision_end"]}


def _scaled(hidden: int, layers: int, heads: int, kv_heads: int, experts: int,
            codebook: int, vision_patch: int = 16) -> dict[str, Any]:
    """A preset's config fields: every part at `hidden` width and `layers` depth, the tiny
    tokenizer's vocabulary and ids, the real layout otherwise (16 code groups, Code2Wav's
    real upsampling so speech is 24 kHz at 1920 samples per frame)."""
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    rope = {"rope_type": "default", "rope_theta": 1000000, "mrope_section": section,
            "interleaved": True, "mrope_interleaved": True}
    # Codec special codes sit above the codebook as the real ones do (2148.. over 2048).
    shift = 2048 - codebook
    talker_vocab = codebook + 1024
    media = _media_ids(TINY_IDS)
    thinker = {
        "audio_config": {
            "num_mel_bins": 128, "encoder_layers": layers, "encoder_attention_heads": heads,
            "encoder_ffn_dim": 2 * hidden, "d_model": hidden, "activation_function": "gelu",
            "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800,
            "conv_chunksize": 500, "downsample_hidden_size": max(8, hidden // 4),
            "output_dim": hidden, "scale_embedding": False},
        "vision_config": {
            "depth": layers, "hidden_size": hidden, "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 2 * hidden, "num_heads": heads, "in_channels": 3,
            "patch_size": vision_patch, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": hidden, "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(range(min(2, layers)))},
        "text_config": {
            "vocab_size": TINY_VOCAB, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "moe_intermediate_size": hidden // 2, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-6, "attention_bias": False, "num_experts": experts,
            "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "tie_word_embeddings": False, "rope_parameters": rope,
            "rope_scaling": rope, "rope_theta": 1000000},
        **media, "position_id_per_seconds": 13, "seconds_per_chunk": 2,
        "user_token_id": TINY_ROLE_IDS["user"],
    }
    talker = {
        "text_config": {
            "vocab_size": talker_vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "moe_intermediate_size": hidden // 2, "shared_expert_intermediate_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
            "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "attention_bias": False,
            "num_experts": experts, "num_experts_per_tok": 2, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
            "rope_parameters": {k: v for k, v in rope.items() if k != "mrope_interleaved"},
            "rope_scaling": {k: v for k, v in rope.items() if k != "mrope_interleaved"},
            "rope_theta": 1000000},
        "code_predictor_config": {
            "vocab_size": codebook, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "attention_bias": False,
            "num_code_groups": 16, "rope_parameters": {"rope_type": "default",
                                                       "rope_theta": 1000000},
            "rope_theta": 1000000},
        "num_code_groups": 16, "thinker_hidden_size": hidden, "accept_hidden_layer": layers - 1,
        **{k: v - shift for k, v in REAL_TALKER.items() if k.startswith("codec_")},
        "speaker_id": {k: v - shift for k, v in REAL_TALKER["speaker_id"].items()},
        **{k: v for k, v in media.items() if k != "vision_end_token_id"},
        "position_id_per_seconds": 13, "seconds_per_chunk": 2, "spatial_merge_size": 2,
    }
    code2wav = {**REAL_CODE2WAV, "codebook_size": codebook, "hidden_size": hidden,
                "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": heads, "intermediate_size": 2 * hidden,
                "codebook_dim": hidden, "vector_quantization_hidden_dimension": hidden,
                "decoder_dim": hidden}
    ids = {"im_start_token_id": TINY_IDS["im_start"], "im_end_token_id": TINY_IDS["im_end"],
           "tts_pad_token_id": TINY_IDS["tts_pad"], "tts_bos_token_id": TINY_IDS["tts_bos"],
           "tts_eos_token_id": TINY_IDS["tts_eos"],
           "system_token_id": TINY_ROLE_IDS["system"], "user_token_id": TINY_ROLE_IDS["user"],
           "assistant_token_id": TINY_ROLE_IDS["assistant"]}
    return {"thinker_config": thinker, "talker_config": talker, "code2wav_config": code2wav,
            **ids}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _scaled(hidden=32, layers=2, heads=4, kv_heads=2, experts=4, codebook=64),
    "small": {**_scaled(hidden=128, layers=4, heads=4, kv_heads=2, experts=8, codebook=256),
              "codec_chunk_frames": 50, "codec_left_context_frames": 10},
    "30b-a3b": {},
}
#: The small presets' context (their packaged YAMLs carry the real model's 32768 tokens).
PRESET_MAX_SEQ_LEN = {"tiny": 4096, "small": 8192}
