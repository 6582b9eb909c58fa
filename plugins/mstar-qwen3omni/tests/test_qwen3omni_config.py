"""Qwen3-Omni's config: the presets are valid transformers configs, the tiny preset's ids
are the packaged tokenizer's, a checkpoint's config.json round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeForConditionalGeneration,
)

from mstar_qwen3omni.config import PRESETS, TINY_VOCAB, Qwen3OmniConfig
from mstar_qwen3omni.model import Qwen3Omni
from mstar_qwen3omni.tokenizer import CHAT_TEMPLATE, load_chat_template, load_tokenizer


def test_tiny_ids_are_the_packaged_tokenizers():
    cfg = Qwen3Omni.make_config(preset="tiny")
    tok = load_tokenizer(None)
    vocab = tok.get_vocab()
    assert len(vocab) <= TINY_VOCAB == cfg.thinker_config["text_config"]["vocab_size"]
    named = {"<|im_start|>": cfg.im_start_token_id, "<|im_end|>": cfg.im_end_token_id,
             "<|audio_pad|>": cfg.audio_token_id, "<|image_pad|>": cfg.image_token_id,
             "<|video_pad|>": cfg.video_token_id, "<|audio_start|>": cfg.audio_start_token_id,
             "<|audio_end|>": cfg.audio_end_token_id,
             "<|vision_start|>": cfg.vision_start_token_id,
             "<|vision_end|>": cfg.vision_end_token_id, "<tts_pad>": cfg.tts_pad_token_id,
             "<tts_text_bos>": cfg.tts_bos_token_id, "<tts_text_eod>": cfg.tts_eos_token_id}
    assert {text: vocab[text] for text in named} == named
    for word, wanted in (("system", cfg.system_token_id), ("user", cfg.user_token_id),
                         ("assistant", cfg.assistant_token_id)):
        assert tok.encode(word, add_special_tokens=False) == [wanted]
    assert load_chat_template(None) == CHAT_TEMPLATE


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_are_transformers_configs(preset):
    cfg = Qwen3Omni.make_config(preset=preset)
    hf = Qwen3OmniMoeConfig(**cfg.hf_dict())
    talker = cfg.talker_config
    # the codec's special codes and speakers sit in the Talker's top 1024 ids, as the real
    # ones do, above the codebook
    vocab, codebook = talker["text_config"]["vocab_size"], cfg.code2wav_config["codebook_size"]
    special = [v for k, v in talker.items() if k.startswith("codec_")]
    assert all(codebook <= v < vocab and v >= vocab - 1024 for v in special)
    assert all(codebook <= v < vocab for v in cfg.speakers.values())
    # the suppressed top 1024 ids lie past the codebook, as in the real 3072 = 2048 + 1024
    assert hf.talker_config.text_config.vocab_size >= 1024 + codebook
    assert cfg.samples_per_frame == 1920  # 24 kHz at 12.5 frames a second
    assert cfg.talker_config["accept_hidden_layer"] < cfg.thinker_config[
        "text_config"]["num_hidden_layers"]


def test_tiny_model_builds_and_its_config_json_round_trips(tmp_path):
    cfg = Qwen3Omni.make_config(preset="tiny")
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**cfg.hf_dict()))
    model.config.save_pretrained(tmp_path)
    back = Qwen3Omni.config_from_checkpoint(json.loads((tmp_path / "config.json").read_text()))
    assert back.hf_dict()["talker_config"]["speaker_id"] == cfg.talker_config["speaker_id"]
    for name in ("im_start_token_id", "tts_bos_token_id", "assistant_token_id",
                 "audio_token_id", "video_token_id", "position_id_per_seconds",
                 "codec_eos_token_id", "samples_per_frame"):
        assert getattr(back, name) == getattr(cfg, name), name
    sizes = back.thinker_config["text_config"]
    assert (sizes["hidden_size"], sizes["num_experts"]) == (32, 4)


def test_real_preset_is_the_checkpoints():
    cfg = Qwen3Omni.make_config(preset="30b-a3b")
    assert cfg == Qwen3OmniConfig()
    assert cfg.speakers == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert cfg.default_speaker == "ethan"
    text = cfg.thinker_config["text_config"]
    assert (text["num_hidden_layers"], text["num_experts"], text["vocab_size"]) == (48, 128,
                                                                                  152064)
    assert cfg.talker_config["accept_hidden_layer"] == 24 and cfg.codec_eos_token_id == 2150
    with pytest.raises(ValueError, match="codec_chunk_frames"):
        Qwen3Omni.make_config(preset="tiny", model_kwargs={"codec_chunk_frames": 0})
    assert PRESETS["30b-a3b"] == {}


def test_checkpoint_is_in_the_hub_layout(tmp_path):
    from safetensors import safe_open

    from mstar_qwen3omni.checkpoint import write_checkpoint

    out = write_checkpoint(tmp_path / "ckpt")
    keys: set[str] = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    assert "thinker.model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert "talker.model.layers.1.mlp.shared_expert_gate.weight" in keys
    assert {"thinker.lm_head.weight", "talker.codec_head.weight",
            "talker.model.codec_embedding.weight", "thinker.audio_tower.conv_out.weight",
            "thinker.visual.pos_embed.weight", "code2wav.code_embedding.weight"} <= keys
    assert not any("gate_up_proj" in k or "language_model" in k for k in keys)
    model = Qwen3Omni(Qwen3Omni.config_from_checkpoint(
        json.loads((out / "config.json").read_text())))
    model.use_checkpoint_files({"default": out})
    assert model.chat_template() == CHAT_TEMPLATE
    assert model.tokenizer().encode("<|im_start|>user", add_special_tokens=False) == [
        model.config.im_start_token_id, model.config.user_token_id]


def test_checkpoint_is_the_same_for_a_seed_and_finite(tmp_path):
    """Every tensor comes from the seed (transformers leaves the Talker's experts
    uninitialised; the writer must set them), so two writes are bitwise equal."""
    from safetensors.torch import load_file

    from mstar_qwen3omni.checkpoint import write_checkpoint

    def tensors(directory):
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    first = tensors(write_checkpoint(tmp_path / "a", seed=5))
    # garbage in freed memory makes uninitialised tensors differ between the two writes
    torch.full((1 << 20,), float("nan")).add_(1)
    second = tensors(write_checkpoint(tmp_path / "b", seed=5))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, second[key]), key
