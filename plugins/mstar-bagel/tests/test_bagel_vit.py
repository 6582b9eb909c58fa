"""BAGEL's ViT path against independent implementations: the tower against transformers'
`SiglipVisionModel` (same tiny config, weights written to a file in ema.safetensors' layout,
loaded through `mstar.weights` with no rename), the connector and position table against
the formula written with transformers' `ACT2FN` and diffusers' sine-cosine table, the
checkpoint names and shapes at full size, and the transforms' resize rule against a plain
reading of the authors' `data/transforms.py` written here (torchvision cannot be installed;
on a Pillow image its resize is Pillow's bicubic resize)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.activations import ACT2FN

from mstar.model.layers.vision import pack_images
from mstar.weights.loader import iter_checkpoint, load_weights
from mstar.weights.spec import WeightSpec
from mstar_bagel.transforms import resized_size, vae_transform, vit_transform
from mstar_bagel.vit import VIT_PRESETS, BagelViT, ViTConfig

torch.set_num_threads(1)
CFG = VIT_PRESETS["tiny"]
LLM_HIDDEN, SIDE = 24, 4


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[SiglipVisionModel, dict[str, torch.Tensor], BagelViT]:
    """The oracle tower, the file's tensors, and ours loaded from that file."""
    hf_cfg = SiglipVisionConfig(**{k: getattr(CFG, k) for k in CFG.__dataclass_fields__},
                                vision_use_head=False, attn_implementation="eager")
    oracle = randomized(SiglipVisionModel(hf_cfg), 0)
    tensors = {f"vit_model.vision_model.{k}": v for k, v in oracle.state_dict().items()}
    # BAGEL's stored patch embedding: the conv weight as a linear layer over patchify rows.
    conv = tensors["vit_model.vision_model.embeddings.patch_embedding.weight"]
    tensors["vit_model.vision_model.embeddings.patch_embedding.weight"] = (
        conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1))
    gen = torch.Generator().manual_seed(1)
    for name, shape in (("fc1.weight", (LLM_HIDDEN, CFG.hidden_size)),
                        ("fc1.bias", (LLM_HIDDEN,)), ("fc2.weight", (LLM_HIDDEN, LLM_HIDDEN)),
                        ("fc2.bias", (LLM_HIDDEN,))):
        tensors[f"connector.{name}"] = torch.randn(shape, generator=gen) * 0.2
    tensors["vit_pos_embed.pos_embed"] = get_2d_sincos_pos_embed(
        LLM_HIDDEN, SIDE, base_size=SIDE, output_type="pt").float()
    path: Path = tmp_path_factory.mktemp("bagel") / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    ours = BagelViT(CFG, LLM_HIDDEN, SIDE)
    load_weights(ours, iter_checkpoint([path]), WeightSpec())
    return oracle, tensors, ours.eval()


def oracle_tower(oracle: SiglipVisionModel, image: torch.Tensor, ids: torch.Tensor
                 ) -> torch.Tensor:
    """transformers' modules with BAGEL's position ids: conv patch embedding, learned
    positions looked up by `ids`, encoder, post-layernorm."""
    patches = oracle.embeddings.patch_embedding(image[None]).flatten(2).transpose(1, 2)
    x = patches + oracle.embeddings.position_embedding(ids)[None]
    x = oracle.encoder(inputs_embeds=x).last_hidden_state
    return oracle.post_layernorm(x)[0]


def oracle_head(tensors: dict[str, torch.Tensor], feats: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
    """connector (fc1, gelu_pytorch_tanh, fc2) + the sine-cosine table at `ids`."""
    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ tensors[f"connector.{name}.weight"].T + tensors[f"connector.{name}.bias"]
    h = lin(ACT2FN["gelu_pytorch_tanh"](lin(feats, "fc1")), "fc2")
    table = get_2d_sincos_pos_embed(LLM_HIDDEN, SIDE, base_size=SIDE, output_type="pt").float()
    return h + table[ids]


def test_vit_tower_equals_siglip_vision_model_on_a_full_grid(models) -> None:
    """A full `image_size` image: BAGEL's extrapolated ids (side 4) are 0..15 row-major, HF's
    own position ids, so the tower is exactly `SiglipVisionModel`."""
    oracle, _, ours = models
    image = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = oracle(pixel_values=image[None]).last_hidden_state[0]
        got = ours.vit_model["vision_model"](*pack_images([image], 7, SIDE))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bagel_vit_equals_the_formula_on_packed_images(models) -> None:
    """Three images of different sizes in one batch: each image's rows are HF's tower at
    BAGEL's ids, then connector + sine-cosine position, as `forward_cache_update_vit`."""
    oracle, tensors, ours = models
    gen = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 28, 28, generator=gen), torch.randn(3, 14, 21, generator=gen),
              torch.randn(3, 21, 7, generator=gen)]
    with torch.no_grad():
        got, lengths = ours(images)
        want = []
        for image in images:
            gh, gw = image.shape[1] // 7, image.shape[2] // 7
            ids = (torch.arange(gh)[:, None] * SIDE + torch.arange(gw)).flatten()
            want.append(oracle_head(tensors, oracle_tower(oracle, image, ids), ids))
    assert lengths == [16, 6, 3] and got.shape == (25, LLM_HIDDEN)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=0)


def test_checkpoint_names_and_shapes_at_full_size() -> None:
    """BAGEL-7B-MoT: ema.safetensors' names, a flat patch embedding, 26 tower layers."""
    cfg = ViTConfig.from_vit_config_json({
        "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 27, "patch_size": 14})
    assert cfg == VIT_PRESETS["bagel-7b"] and cfg.num_hidden_layers == 26
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BagelViT(cfg, 3584, 70).state_dict().items()}
    tower = "vit_model.vision_model."
    assert shapes[tower + "embeddings.patch_embedding.weight"] == (1152, 588)
    assert shapes[tower + "embeddings.position_embedding.weight"] == (4900, 1152)
    assert shapes[tower + "encoder.layers.25.self_attn.out_proj.weight"] == (1152, 1152)
    assert shapes[tower + "encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert tower + "encoder.layers.26.layer_norm1.weight" not in shapes
    assert shapes[tower + "post_layernorm.bias"] == (1152,)
    assert shapes["connector.fc1.weight"] == (3584, 1152)
    assert shapes["connector.fc2.weight"] == (3584, 3584)
    assert shapes["vit_pos_embed.pos_embed"] == (4900, 3584)
    assert all(k.startswith((tower, "connector.", "vit_pos_embed.")) for k in shapes)


def test_position_tables_must_share_a_side() -> None:
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side is 5"):
        BagelViT(CFG, LLM_HIDDEN, 5)


def reference_resize(width: int, height: int, max_size: int, min_size: int, stride: int,
                     max_pixels: int = 14 * 14 * 9 * 1024) -> tuple[int, int]:
    """MaxLongEdgeMinShortEdgeResize.forward's size arithmetic, read line by line."""
    def make_divisible(value: float) -> int:
        return max(stride, int(round(value / stride) * stride))

    def apply_scale(w: int, h: int, scale: float) -> tuple[int, int]:
        return make_divisible(round(w * scale)), make_divisible(round(h * scale))

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply_scale(width, height, scale)
    if w * h > max_pixels / 1:
        w, h = apply_scale(w, h, max_pixels / 1 / (w * h))
    if max(w, h) > max_size:
        w, h = apply_scale(w, h, max_size / max(w, h))
    return w, h


SIZES = [(640, 480), (100, 50), (4000, 3000), (3000, 100), (224, 224), (981, 979), (37, 1200)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rule", [(980, 224, 14), (1024, 512, 16)])
def test_resize_rule_matches_the_authors(size: tuple[int, int],
                                         rule: tuple[int, int, int]) -> None:
    want = reference_resize(*size, *rule)
    assert resized_size(*size, *rule) == want
    assert want[0] % rule[2] == 0 and want[1] % rule[2] == 0
    small = 300 * 300  # the area bound bites only below the defaults' sizes
    assert resized_size(*size, *rule, max_pixels=small) == reference_resize(*size, *rule,
                                                                            small)


def test_transforms_resize_and_normalise() -> None:
    image = Image.new("RGB", (640, 480), (255, 0, 128))
    vit = vit_transform(image)
    assert vit.shape == (3, 476, 644) and vit.dtype == torch.float32
    torch.testing.assert_close(vit[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    assert vae_transform(image).shape == (3, 512, 688)
    clear = Image.new("RGBA", (300, 300), (10, 20, 30, 0))  # transparent: over white
    assert torch.equal(vit_transform(clear), torch.ones(3, 294, 294))
