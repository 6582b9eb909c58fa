"""Qwen3-Omni's audio encoder against transformers' `Qwen3OmniMoeAudioEncoder`: a tiny
encoder with seeded random weights is written in the hub layout (`thinker.audio_tower.*`,
beside a key of another component), ours is loaded from that file through `mstar.weights`,
and both run on the same mel features (float32, atol 1e-5). Clips of several chunks (and
attention windows) and a short clip run in one call; each must equal HF on that clip alone.
At full size, our module built on the meta device has exactly the hub's names and shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    _get_feat_extract_output_lengths,
)

from mstar.model import config_from_fields
from mstar.weights import iter_checkpoint, load_weights
from mstar_qwen3omni.audio_encoder import (
    AudioEncoder,
    AudioEncoderConfig,
    AudioEncoderNode,
    audio_output_length,
    audio_weight_spec,
)

torch.set_num_threads(1)
# n_window stays 50: HF's length formula hard-codes the 13 rows of a 100-frame chunk.
TINY = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
            encoder_ffn_dim=48, n_window=50, n_window_infer=200, downsample_hidden_size=8,
            output_dim=24, conv_chunksize=2)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Qwen3OmniMoeAudioEncoder, AudioEncoderNode]:
    hf_cfg = Qwen3OmniMoeAudioEncoderConfig(**TINY)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    oracle = Qwen3OmniMoeAudioEncoder(hf_cfg).eval()
    with torch.no_grad():
        for p in oracle.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    tensors = {f"thinker.audio_tower.{k}": v.contiguous()
               for k, v in oracle.state_dict().items()}
    tensors["thinker.model.embed_tokens.weight"] = torch.zeros(4, 4)
    path = tmp_path_factory.mktemp("qwen3omni_audio") / "model.safetensors"
    save_file(tensors, path)
    ours = AudioEncoderNode(config_from_fields(AudioEncoderConfig, hf_cfg.to_dict()))
    load_weights(ours, iter_checkpoint([path]), audio_weight_spec())
    return oracle, ours.eval()


def hf_alone(oracle: Qwen3OmniMoeAudioEncoder, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return oracle(input_features=feats,
                      feature_lens=torch.tensor([feats.shape[1]])).last_hidden_state


def test_clips_of_several_chunks_and_windows_in_one_call_equal_hf(encoders) -> None:
    """250 frames: chunks of 100, 100, 50 -> 13 + 13 + 7 rows in windows of 26 and 7;
    430 frames: 4 chunks and a tail of 30, three windows; 37 frames: one short chunk."""
    oracle, ours = encoders
    gen = torch.Generator().manual_seed(1)
    clips = [torch.randn(16, n, generator=gen) for n in (250, 37, 430)]
    with torch.no_grad():
        got = ours([{"input_features": c} for c in clips])
    for clip, out in zip(clips, got):
        want = hf_alone(oracle, clip)
        assert out["audio_embeds"].shape == (audio_output_length(clip.shape[1]), 24)
        torch.testing.assert_close(out["audio_embeds"], want, atol=1e-5, rtol=1e-5)


def test_a_clip_does_not_depend_on_its_batch(encoders) -> None:
    _, ours = encoders
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 180, generator=gen), torch.randn(16, 61, generator=gen)
    with torch.no_grad():
        together = ours([{"input_features": a}, {"input_features": b}])
        alone = [ours([{"input_features": x}])[0] for x in (a, b)]
    for t, s in zip(together, alone):
        torch.testing.assert_close(t["audio_embeds"], s["audio_embeds"], atol=1e-6, rtol=0)


def test_output_length_is_hf_formula() -> None:
    frames = torch.arange(1, 3001)
    want = _get_feat_extract_output_lengths(frames, 50).tolist()
    assert [audio_output_length(n) for n in range(1, 3001)] == want
    assert audio_output_length(3000) == 390  # 30 s of speech at 100 frames/s


def test_real_size_builds_on_meta_with_the_hub_names() -> None:
    """Qwen3-Omni-30B-A3B's audio tower: HF's module (meta) under the hub prefix maps onto
    ours key for key, shape for shape."""
    hf_cfg = Qwen3OmniMoeAudioEncoderConfig(output_dim=2048)
    cfg = config_from_fields(AudioEncoderConfig, hf_cfg.to_dict())
    assert cfg == AudioEncoderConfig()
    with torch.device("meta"):
        hub = {f"thinker.audio_tower.{k}": v.shape
               for k, v in Qwen3OmniMoeAudioEncoder(hf_cfg).state_dict().items()}
        ours = AudioEncoder(cfg)
    spec = audio_weight_spec()
    mapped = {spec.map_key(k): shape for k, shape in hub.items()}
    assert mapped == {k: v.shape for k, v in ours.state_dict().items()}
    assert spec.map_key("thinker.visual.blocks.0.norm1.weight") is None
    assert sum(v.numel() for v in ours.parameters()) > 600_000_000


def test_bad_features_are_refused(encoders) -> None:
    _, ours = encoders
    for shape in ((16, 0), (15, 100), (16,)):
        with pytest.raises(ValueError, match="audio features must be"):
            ours([{"input_features": torch.zeros(shape)}])
