"""The SigLIP vision layers against transformers' `SiglipVisionModel` (the oracle), loaded
through `mstar.weights` from a safetensors file written from the oracle's state dict; the
ragged batch (images of different sizes packed together give each image's rows alone); the
patch embedding in both weight layouts against a strided convolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.activations import ACT2FN

from mstar.model import config_from_fields
from mstar.model.layers import MLP, PatchEmbedding, SiglipConfig, SiglipVisionTransformer
from mstar.model.layers.embeddings import patchify
from mstar.model.layers.vision import pack_images
from mstar.weights.loader import iter_checkpoint, load_weights
from mstar.weights.spec import WeightSpec

torch.set_num_threads(1)
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=7, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
#: The oracle's pooling head has no counterpart in the towers we serve.
SPEC = WeightSpec(key_map=((r"head\..*", None),))


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from a seeded normal, so norms' scales and biases matter too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[SiglipVisionModel, SiglipVisionTransformer]:
    """The oracle and ours, ours loaded from the oracle's weights written to a file."""
    oracle = randomized(SiglipVisionModel(SiglipVisionConfig(**TINY,
                                                             attn_implementation="eager")), 0)
    path: Path = tmp_path_factory.mktemp("siglip") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, path)
    ours = SiglipVisionTransformer(config_from_fields(SiglipConfig, TINY))
    report = load_weights(ours, iter_checkpoint([path]), SPEC)
    assert report.ignored and all(k.startswith("head.") for k in report.ignored)
    return oracle, ours.eval()


def test_siglip_tower_matches_transformers(pair) -> None:
    oracle, ours = pair
    image = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = oracle(pixel_values=image[None]).last_hidden_state[0]
        got = ours(*pack_images([image], 7, ours.cfg.positions_per_side))
    assert got.shape == want.shape == (16, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_packed_images_of_different_sizes_equal_each_alone(pair) -> None:
    _, ours = pair
    gen = torch.Generator().manual_seed(2)
    images = [torch.randn(3, 28, 28, generator=gen), torch.randn(3, 14, 21, generator=gen),
              torch.randn(3, 7, 7, generator=gen)]
    side = ours.cfg.positions_per_side
    with torch.no_grad():
        packed = ours(*pack_images(images, 7, side))
        alone = [ours(*pack_images([image], 7, side)) for image in images]
    assert [a.shape[0] for a in alone] == [16, 6, 1]
    for got, want in zip(packed.split([16, 6, 1]), alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pack_images_ids_follow_rows_and_columns() -> None:
    patches, ids, lengths = pack_images([torch.zeros(3, 14, 21), torch.zeros(3, 28, 28)], 7, 4)
    assert lengths == [6, 16] and patches.shape == (22, 147)
    assert ids[:6].tolist() == [0, 1, 2, 4, 5, 6]
    assert ids[6:].tolist() == list(range(16))


@pytest.mark.parametrize("flat", [False, True])
def test_patch_embedding_equals_strided_conv(flat: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    conv_w, bias = torch.randn(8, 3, 4, 4, generator=gen), torch.randn(8, generator=gen)
    image = torch.randn(3, 8, 12, generator=gen)
    embed = PatchEmbedding(3, 8, 4, flat=flat)
    with torch.no_grad():
        # BAGEL's stored form: the conv weight laid out in patchify's (row, col, channel) order.
        embed.weight.copy_(conv_w.permute(0, 2, 3, 1).flatten(1) if flat else conv_w)
        embed.bias.copy_(bias)
        got = embed(patchify(image, 4))
    want = F.conv2d(image[None], conv_w, bias, stride=4)[0].flatten(1).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_mlp_activations_are_transformers(act: str) -> None:
    mlp = randomized(MLP(6, 10, 4, act=act), 4)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = mlp.fc2(ACT2FN[act](mlp.fc1(x)))
        torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(6, 10, act="swish7")
