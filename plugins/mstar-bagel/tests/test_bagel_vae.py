"""BAGEL's FLUX VAE against `diffusers.AutoencoderKL` configured as FLUX's (the oracle).

Our two node modules are written to one `ae.safetensors` in the original (BFL) key layout,
which diffusers' own single-file converter for that layout (`convert_ldm_vae_checkpoint`)
turns into its names: a name or shape of ours that is not the original's leaves a diffusers
parameter missing. Ours load from the file through the runtime's loader, each node taking
its half. diffusers leaves FLUX's latent scale and shift to its pipeline, so the oracle's
side applies `(z - shift) * scale` and `z / scale + shift` as the FLUX pipeline does.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from torch import nn

from mstar.weights import (
    WeightLoadError,
    checkpoint_files,
    iter_checkpoint,
    load_weights,
    materialize,
    resolve_source,
)
from mstar_bagel.autoencoder import (
    AE_FILE,
    AEConfig,
    VAEDecoderNode,
    VAEEncoderNode,
    vae_weight_spec,
)

torch.set_num_threads(1)  # tests/conftest.py does not reach plugin test folders

TOL = 1e-4
CONFIG = AEConfig.tiny()


def diffusers_flux_vae(config: AEConfig) -> AutoencoderKL:
    """AutoencoderKL as diffusers configures FLUX.1's VAE (no quant convs), at `config`."""
    levels = len(config.ch_mult)
    return AutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
        norm_num_groups=32, scaling_factor=config.scale_factor,
        shift_factor=config.shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def original_state(config: AEConfig) -> dict[str, torch.Tensor]:
    """Our modules' parameters under their names (the original file's, we claim)."""
    return {**VAEEncoderNode(config).state_dict(), **VAEDecoderNode(config).state_dict()}


def seeded(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor drawn (no default init hides a mistake), at scales that keep activations
    O(1): norm gains near 1, small biases, conv weights over sqrt(fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state.items():
        x = torch.randn(value.shape, generator=gen)
        if value.dim() == 1:
            x = 1.0 + 0.1 * x if ".norm" in name and name.endswith("weight") else 0.1 * x
        else:
            x = x / math.sqrt(value[0].numel())
        out[name] = x.contiguous()
    return out


def load_node(module_type: type[nn.Module], half: str, directory: Path) -> nn.Module:
    """Build on meta and materialise from the checkpoint, as the runtime's builder does."""
    spec = vae_weight_spec(half)  # type: ignore[arg-type]
    files = checkpoint_files(resolve_source(str(directory), patterns=spec.patterns),
                             spec.patterns)
    with torch.device("meta"):
        module = module_type(CONFIG)

    def load(m: nn.Module) -> list[str]:
        return load_weights(m, iter_checkpoint(files, spec.format), spec,
                            dtype=torch.float32).loaded

    return materialize(module, torch.device("cpu"), torch.float32, load).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("bagel_ae")
    state = seeded(original_state(CONFIG), seed=0)
    save_file(state, str(directory / AE_FILE))
    return directory, state


@pytest.fixture(scope="module")
def models(checkpoint) -> tuple[AutoencoderKL, VAEEncoderNode, VAEDecoderNode]:
    directory, state = checkpoint
    oracle = diffusers_flux_vae(CONFIG)
    oracle.load_state_dict(convert_ldm_vae_checkpoint(state, oracle.config), strict=True)
    encoder = load_node(VAEEncoderNode, "encoder", directory)
    decoder = load_node(VAEDecoderNode, "decoder", directory)
    return oracle.eval(), encoder, decoder  # type: ignore[return-value]


def test_names_and_shapes_are_the_flux_files_at_real_size() -> None:
    """At the real size (on meta, no memory) diffusers' converter maps every tensor of ours
    onto exactly AutoencoderKL-as-FLUX's parameters, shapes equal."""
    config = AEConfig()
    assert config.downsample == 8
    with torch.device("meta"):
        ours = original_state(config)
        reference = diffusers_flux_vae(config).state_dict()
    converted = convert_ldm_vae_checkpoint(dict(ours), {
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4})
    assert len(converted) == len(ours)  # nothing of ours dropped by the converter
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in reference.items()}


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_encode_matches_diffusers(models, height: int, width: int) -> None:
    """The mean and a sample with given noise, shifted and scaled, as FLUX's pipeline does
    with diffusers' latent distribution."""
    oracle, encoder, _ = models
    gen = torch.Generator().manual_seed(height + width)
    pixels = torch.rand(2, 3, height, width, generator=gen) * 2 - 1
    d = CONFIG.downsample
    noise = torch.randn(2, CONFIG.z_channels, height // d, width // d, generator=gen)
    with torch.no_grad():
        dist = oracle.encode(pixels).latent_dist
        mean = encoder.encode(pixels)
        sample = encoder.encode(pixels, noise)
    assert mean.shape == (2, CONFIG.z_channels, height // d, width // d)
    scale, shift = oracle.config.scaling_factor, oracle.config.shift_factor
    torch.testing.assert_close(mean, (dist.mean - shift) * scale, rtol=0, atol=TOL)
    torch.testing.assert_close(sample, (dist.mean + dist.std * noise - shift) * scale,
                               rtol=0, atol=TOL)
    assert (sample - mean).abs().max() > 10 * TOL  # the noise is used, at this scale


@pytest.mark.parametrize("height,width", [(8, 8), (8, 12)])
def test_decode_matches_diffusers(models, height: int, width: int) -> None:
    oracle, _, decoder = models
    gen = torch.Generator().manual_seed(height * width)
    latents = torch.randn(2, CONFIG.z_channels, height, width, generator=gen)
    with torch.no_grad():
        expected = oracle.decode(latents / oracle.config.scaling_factor
                                 + oracle.config.shift_factor).sample
        pixels = decoder.decode(latents)
    d = CONFIG.downsample
    assert pixels.shape == (2, CONFIG.out_ch, height * d, width * d)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=TOL)


def test_each_node_needs_its_own_half(checkpoint, tmp_path: Path) -> None:
    """A file holding only the decoder's keys loads the decoder node and fails the encoder
    node, naming its missing parameters (the decoder's keys are ignored, not unexpected)."""
    _, state = checkpoint
    save_file({k: v for k, v in state.items() if k.startswith("decoder.")},
              str(tmp_path / AE_FILE))
    assert isinstance(load_node(VAEDecoderNode, "decoder", tmp_path), VAEDecoderNode)
    with pytest.raises(WeightLoadError) as err:
        load_node(VAEEncoderNode, "encoder", tmp_path)
    assert not err.value.unexpected
    assert "encoder.conv_in.weight" in err.value.missing


def test_sizes_that_do_not_divide_are_refused() -> None:
    encoder = VAEEncoderNode(CONFIG)
    with pytest.raises(ValueError, match="multiples of 4"):
        encoder.encode(torch.zeros(1, 3, 32, 30))
    with pytest.raises(ValueError, match=r"\[batch, 16, height, width\]"):
        VAEDecoderNode(CONFIG).decode(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="multiple of 32"):
        dataclasses.replace(CONFIG, ch=16)
