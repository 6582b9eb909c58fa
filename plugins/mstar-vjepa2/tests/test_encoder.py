"""V-JEPA 2's encoder, masked predictor, RoPE and preprocessing against Hugging Face
`transformers` (the oracle, ORACLES.md).

A tiny `VJEPA2Model` with seeded random weights (mask tokens and norms included) is saved
as `model.safetensors` + `config.json` in the hub layout; our config is built from that
config.json and our modules load the file through `WEIGHT_KEY_MAPS` with core's loader.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import VJEPA2Config, VJEPA2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.vjepa2 import modeling_vjepa2 as hf
from transformers.models.vjepa2.video_processing_vjepa2 import VJEPA2VideoProcessor

from mstar.media import Video
from mstar.weights import WeightSpec, iter_checkpoint, load_weights
from mstar_vjepa2.config import PRESETS, VJepa2Config, from_hub
from mstar_vjepa2.encoder import WEIGHT_KEY_MAPS as ENCODER_KEYS
from mstar_vjepa2.encoder import VideoEncoder
from mstar_vjepa2.predictor import WEIGHT_KEY_MAPS as PREDICTOR_KEYS
from mstar_vjepa2.predictor import MaskedPredictor
from mstar_vjepa2.processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_video,
    resize_shortest_edge,
    resized_size,
)
from mstar_vjepa2.rope import grid_positions, rope_3d

TOL = 1e-5
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[VJEPA2Model, Path]:
    """The oracle model and the directory holding its hub-layout checkpoint."""
    torch.manual_seed(0)
    config = VJEPA2Config(**dataclasses.asdict(VJepa2Config(**PRESETS["tiny"])))
    model = VJEPA2Model(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    directory = tmp_path_factory.mktemp("vjepa2")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return model, directory


def _load(module_cls: type, node: str, key_maps: dict, directory: Path) -> torch.nn.Module:
    cfg = from_hub(json.loads((directory / "config.json").read_text()))
    module = module_cls(cfg).eval()
    load_weights(module, iter_checkpoint([directory / "model.safetensors"]),
                 WeightSpec(key_map=key_maps[node]))
    return module


def _clip(frames: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_config_from_hub_config_json(hub: tuple[VJEPA2Model, Path]) -> None:
    cfg = from_hub(json.loads((hub[1] / "config.json").read_text()))
    assert cfg == VJepa2Config(**PRESETS["tiny"])
    assert from_hub({"patch_size": [16, 16]}).patch_size == 16
    assert from_hub(VJEPA2Config().to_dict()) == VJepa2Config(**PRESETS["vitl"])


@torch.no_grad()
def test_encoder_ragged_batch_matches_transformers(hub: tuple[VJEPA2Model, Path]) -> None:
    """Clips of 4, 2 and 6 frames in one pass equal the oracle run on each alone."""
    model, directory = hub
    encoder = _load(VideoEncoder, "video_encoder", ENCODER_KEYS, directory)
    clips = [_clip(4, 1), _clip(2, 2), _clip(6, 3)]
    ours = encoder([{"pixel_values": c} for c in clips])
    for clip, out in zip(clips, ours):
        want = model(pixel_values_videos=clip[None], skip_predictor=True).last_hidden_state[0]
        assert out["latents"].shape == want.shape == (clip.shape[0] // 2 * 16, 32)
        torch.testing.assert_close(out["latents"], want, atol=TOL, rtol=0)


@torch.no_grad()
def test_predictor_ragged_batch_matches_transformers(hub: tuple[VJEPA2Model, Path]) -> None:
    """Two items of different context/target sizes, ids unsorted, one target in a frame
    after the clip (the predictor extrapolates), equal the oracle's predictor per item."""
    model, directory = hub
    predictor = _load(MaskedPredictor, "predictor", PREDICTOR_KEYS, directory)
    gen = torch.Generator().manual_seed(4)
    items = []
    for frames, n_ctx, targets in ((4, 20, None), (2, 5, torch.tensor([40, 3, 17]))):
        latents = model(pixel_values_videos=_clip(frames, frames)[None],
                        skip_predictor=True).last_hidden_state[0]
        order = torch.randperm(latents.shape[0], generator=gen)
        context = order[:n_ctx]
        target = order[n_ctx:] if targets is None else targets
        items.append({"latents": latents, "context_ids": context, "target_ids": target})
    ours = predictor(items)
    for item, out in zip(items, ours):
        want = model.predictor(encoder_hidden_states=item["latents"][None],
                               context_mask=[item["context_ids"][None]],
                               target_mask=[item["target_ids"][None]]).last_hidden_state[0]
        assert out["predictions"].shape == (len(item["target_ids"]), 32)
        torch.testing.assert_close(out["predictions"], want, atol=TOL, rtol=0)


def test_encoder_and_predictor_reject_malformed_items() -> None:
    cfg = VJepa2Config(**PRESETS["tiny"])
    encoder, predictor = VideoEncoder(cfg), MaskedPredictor(cfg)
    for pixels in (_clip(3, 0), _clip(2, 0, size=30), torch.zeros(2, 32, 32, 3)):
        with pytest.raises(ValueError, match="pixel_values"):
            encoder([{"pixel_values": pixels}])
    latents = torch.zeros(32, cfg.hidden_size)
    with pytest.raises(ValueError, match="32 latents"):
        predictor([{"latents": latents, "context_ids": torch.tensor([0, 32]),
                    "target_ids": torch.tensor([1])}])


def test_key_maps_route_every_hub_key_to_one_node(hub: tuple[VJEPA2Model, Path]) -> None:
    keys = hub[0].state_dict().keys()
    enc, pred = (WeightSpec(key_map=m[n]) for m, n in ((ENCODER_KEYS, "video_encoder"),
                                                        (PREDICTOR_KEYS, "predictor")))
    assert all((enc.map_key(k) is None) != (pred.map_key(k) is None) for k in keys)
    # a VJEPA2ForVideoClassification checkpoint's head is ignored by both
    assert enc.map_key("pooler.query_tokens") is None is pred.map_key("classifier.weight")
    assert enc.map_key("vjepa2.encoder.layernorm.weight") == "layernorm.weight"


@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_matches_transformers(head_dim: int) -> None:
    """Integer grid positions through the oracle attention's own position split and
    rotation (vitl's head_dim 64 leaves 4 dims unrotated, tiny's 16 as well)."""
    config = VJEPA2Config(hidden_size=head_dim * 2, num_attention_heads=2, crop_size=32,
                          patch_size=8)
    attention = hf.VJEPA2RopeAttention(config, config.hidden_size, 2)
    x = torch.randn(1, 2, 48, head_dim, generator=torch.Generator().manual_seed(5))
    ids = torch.randperm(48, generator=torch.Generator().manual_seed(6))
    want = attention.apply_rotary_embeddings(x, attention.get_position_ids(x, masks=ids[None]))
    ours = rope_3d(x[0].transpose(0, 1), *grid_positions(ids, 4, 4))
    torch.testing.assert_close(ours, want[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_rope_fractional_and_frame_only() -> None:
    """The AC predictor's uses: fractional h/w positions, and tokens rotated by frame only."""
    x = torch.randn(10, 3, 48, generator=torch.Generator().manual_seed(7))
    t, h, w = torch.arange(10.0), torch.rand(10) * 16, torch.rand(10) * 16
    d = 16
    xr = x.transpose(0, 1)[None]  # the oracle's [B, heads, N, D]
    parts = [hf.rotate_queries_or_keys(xr[..., i * d:(i + 1) * d], pos)
             for i, pos in enumerate((t, h, w))]
    torch.testing.assert_close(rope_3d(x, t, h, w), torch.cat(parts, -1)[0].transpose(0, 1),
                               atol=1e-6, rtol=0)
    frame_only = torch.cat([parts[0], xr[..., d:]], -1)[0].transpose(0, 1)
    torch.testing.assert_close(rope_3d(x, t), frame_only, atol=1e-6, rtol=0)


def test_processing_constants_are_the_processors() -> None:
    assert resize_shortest_edge(256) == VJEPA2VideoProcessor.size["shortest_edge"] == 292
    assert VJEPA2VideoProcessor.crop_size == 256
    assert VJEPA2VideoProcessor.resample == 2  # PILImageResampling.BILINEAR
    assert (IMAGENET_MEAN, IMAGENET_STD) == (tuple(IMAGENET_DEFAULT_MEAN),
                                             tuple(IMAGENET_DEFAULT_STD))
    assert resized_size(30, 45, 36) == (36, 54) and resized_size(50, 40, 36) == (45, 36)


def test_processing_crops_the_centre_and_normalises() -> None:
    """A 36×60 frame is already at the tiny crop's shortest edge (36): the resize keeps
    it, the crop takes rows 2..34 and columns 14..46, then /255 and mean/std."""
    cfg = VJepa2Config(**PRESETS["tiny"])
    frames = np.random.default_rng(8).integers(0, 256, (5, 36, 60, 3), dtype=np.uint8)
    out = preprocess_video(Video(frames=frames, fps=4.0, timestamps=[0.0] * 5), cfg)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32  # 5 frames -> 4
    crop = torch.from_numpy(frames[:4, 2:34, 14:46]).permute(0, 3, 1, 2).float() / 255
    want = (crop - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_processing_matches_the_processors_output() -> None:
    """Frames and the real `VJEPA2VideoProcessor`'s pixel values (crop 32; written by
    fixtures/make_processor_fixture.py with torchvision, outside CI): a landscape clip
    downscaled and a portrait clip upscaled to the shortest edge 36. The processor keeps
    all 3 landscape frames; we keep the 2 of one tubelet."""
    cfg = VJepa2Config(**PRESETS["tiny"])
    fixture = np.load(FIXTURES / "processor_fixture.npz")
    for name, kept in (("landscape", 2), ("portrait", 2)):
        out = preprocess_video(fixture[f"{name}_frames"], cfg)
        want = torch.from_numpy(fixture[f"{name}_pixel_values"])[:kept]
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_processing_keeps_a_constant_frame_constant() -> None:
    """In both layouts: [T, H, W, 3] in 0..255 and [T, 3, H, W] in [0, 1]."""
    cfg = VJepa2Config(**PRESETS["tiny"])
    want = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    want = want[None, :, None, None].expand(2, 3, 32, 32)
    for flat in (torch.full((2, 50, 30, 3), 200.0), torch.full((2, 3, 50, 30), 200 / 255)):
        torch.testing.assert_close(preprocess_video(flat, cfg), want, atol=1e-6, rtol=0)


def test_processing_channels_first_floats_equal_channels_last() -> None:
    cfg = VJepa2Config(**PRESETS["tiny"])
    frames = torch.rand(4, 40, 70, 3, generator=torch.Generator().manual_seed(10)) * 255
    torch.testing.assert_close(preprocess_video(frames.permute(0, 3, 1, 2) / 255, cfg),
                               preprocess_video(frames, cfg), atol=1e-5, rtol=0)


def test_processing_rejects_too_few_frames_and_bad_shapes() -> None:
    cfg = VJepa2Config(**PRESETS["tiny"])
    with pytest.raises(ValueError, match="at least 2"):
        preprocess_video(np.zeros((1, 40, 40, 3), np.uint8), cfg)
    for bad in (np.zeros((4, 3, 40, 40), np.uint8), np.zeros((4, 40, 40), np.uint8)):
        with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
            preprocess_video(bad, cfg)
    with pytest.raises(ValueError, match="empty"):
        preprocess_video(np.zeros((4, 0, 40, 3), np.uint8), cfg)
