"""Qwen3-Omni's vision encoder against transformers' `Qwen3OmniMoeVisionEncoder`: a tiny
encoder with seeded random weights is written in the hub layout (`thinker.visual.*`, beside
a key of another component), ours is loaded from that file through `mstar.weights`, and
both run on the same patches (float32, atol 1e-5): two images of different sizes and a
two-step video in one call, each compared with HF on that item alone (embeddings and every
deepstack feature). At full size, our module built on the meta device has exactly the hub's
names (after the MLP renames) and shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeVisionEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeVisionEncoder,
)

from mstar.model import config_from_fields
from mstar.weights import iter_checkpoint, load_weights
from mstar_qwen3omni.vision_encoder import (
    VisionEncoder,
    VisionEncoderConfig,
    VisionEncoderNode,
    vision_weight_spec,
)

torch.set_num_threads(1)
TINY = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, in_channels=3,
            patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=24,
            num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
            rope_parameters={"rope_type": "axial", "rope_theta": 500.0})
PATCH_DIM = 3 * 2 * 4 * 4


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Qwen3OmniMoeVisionEncoder, VisionEncoderNode]:
    hf_cfg = Qwen3OmniMoeVisionEncoderConfig(**TINY)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    oracle = Qwen3OmniMoeVisionEncoder(hf_cfg).eval()
    with torch.no_grad():
        for p in oracle.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    tensors = {f"thinker.visual.{k}": v.contiguous() for k, v in oracle.state_dict().items()}
    tensors["talker.codec_head.weight"] = torch.zeros(4, 4)
    path = tmp_path_factory.mktemp("qwen3omni_vision") / "model.safetensors"
    save_file(tensors, path)
    cfg = config_from_fields(VisionEncoderConfig, hf_cfg.to_dict())
    assert cfg.rope_theta == 500.0 and cfg.deepstack_visual_indexes == (0, 2)
    ours = VisionEncoderNode(cfg)
    load_weights(ours, iter_checkpoint([path]), vision_weight_spec())
    return oracle, ours.eval()


def hf_alone(oracle: Qwen3OmniMoeVisionEncoder, rows: torch.Tensor, grid: list[int]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = oracle(rows, grid_thw=torch.tensor([grid]))
    return out.pooler_output, out.deepstack_features


def test_images_and_a_video_in_one_call_equal_hf(encoders) -> None:
    """A 4×6-patch image (positions interpolated up from the 4×4 table), a 2×2 image
    (down) and a 2-step 6×4 video (attention per frame) in one batch."""
    oracle, ours = encoders
    gen = torch.Generator().manual_seed(1)
    grids = [[1, 4, 6], [1, 2, 2], [2, 6, 4]]
    items = [{"pixel_values": torch.randn(t * h * w, PATCH_DIM, generator=gen),
              "grid_thw": torch.tensor(g)} for g in grids for t, h, w in [g]]
    with torch.no_grad():
        got = ours(items)
    for item, out, (t, h, w) in zip(items, got, grids):
        embeds, deepstack = hf_alone(oracle, item["pixel_values"], [t, h, w])
        assert out["vision_embeds"].shape == (t * h * w // 4, 24)
        assert out["deepstack"].shape == (2, t * h * w // 4, 24)
        torch.testing.assert_close(out["vision_embeds"], embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["deepstack"], torch.stack(deepstack), atol=1e-5,
                                   rtol=1e-5)


def test_bad_grid_is_refused(encoders) -> None:
    _, ours = encoders
    with pytest.raises(ValueError, match="do not match grid_thw"):
        ours([{"pixel_values": torch.zeros(7, PATCH_DIM), "grid_thw": torch.tensor([1, 2, 2])}])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        ours([{"pixel_values": torch.zeros(6, PATCH_DIM), "grid_thw": torch.tensor([1, 3, 2])}])


def test_real_size_builds_on_meta_with_the_hub_names() -> None:
    hf_cfg = Qwen3OmniMoeVisionEncoderConfig(out_hidden_size=2048)
    cfg = config_from_fields(VisionEncoderConfig, hf_cfg.to_dict())
    assert cfg.rope_theta == 10000.0 and cfg.patch_dim == 3 * 2 * 16 * 16
    with torch.device("meta"):
        hub = {f"thinker.visual.{k}": v.shape
               for k, v in Qwen3OmniMoeVisionEncoder(hf_cfg).state_dict().items()}
        ours = VisionEncoder(cfg)
    spec = vision_weight_spec()
    mapped = {spec.map_key(k): shape for k, shape in hub.items()}
    assert mapped == {k: v.shape for k, v in ours.state_dict().items()}
    assert "merger_list.2.mlp.fc2.weight" in mapped
    assert spec.map_key("thinker.audio_tower.conv2d1.weight") is None
