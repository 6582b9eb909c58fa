"""A tiny BAGEL checkpoint in the real hub layout (`ByteDance-Seed/BAGEL-7B-MoT`), for CPU
tests and offline trials:

- `ema.safetensors`: the LLM under `language_model.*` (both experts), `vae2llm`, `llm2vae`,
  `time_embedder.*`, `latent_pos_embed.pos_embed`, the ViT under `vit_model.vision_model.*`
  (patch embedding stored flat), `connector.*`, `vit_pos_embed.pos_embed`;
- `ae.safetensors`: the FLUX VAE under its original names (`encoder.*`, `decoder.*`);
- `llm_config.json` (Qwen2 fields + `qk_norm`, `layer_module`), `vit_config.json` (SigLIP
  fields; one layer more than the model runs, as the authors' loader drops the last),
  `config.json` (the fields joining them; a tiny one also carries its VAE sizes and image
  sizes, which the real file leaves to the code's defaults);
- `tokenizer.json` + `tokenizer_config.json`: the packaged tiny tokenizer.

`python -m mstar_bagel.checkpoint DIR [--preset tiny|small] [--seed N]` writes one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mstar_bagel.config import PRESETS, BagelConfig
from mstar_bagel.tokenizer import write_tokenizer

_TOP_FIELDS = ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side",
               "connector_act", "interpolate_pos", "image_sizes", "vae_transform",
               "vit_transform")


def _seeded(name: str, param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Values that keep activations O(1) through a few layers: norms near 1, small biases,
    weights of variance 1/fan-in; fixed sine-cosine tables kept as built."""
    if name.endswith("pos_embed"):
        return param.detach().clone()
    noise = torch.randn(param.shape, generator=gen)
    if "norm" in name:
        return (1.0 + 0.1 * noise) if name.endswith("weight") else 0.02 * noise
    if param.dim() == 1:
        return 0.02 * noise
    fan_in = math.prod(param.shape[1:])
    return noise / math.sqrt(fan_in)


def _weights(module: nn.Module, gen: torch.Generator, prefix: str = "") -> dict[str, Any]:
    return {prefix + name: _seeded(name, p, gen).contiguous()
            for name, p in module.named_parameters()}


def llm_config_json(config: BagelConfig) -> dict[str, Any]:
    c = config.llm
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "layer_module": "Qwen2MoTDecoderLayer", "attention_dropout": 0.0,
            "use_sliding_window": False, "torch_dtype": "float32",
            **dataclasses.asdict(c)}


def vit_config_json(config: BagelConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(config.vit)
    return {"model_type": "siglip_vision_model", "num_channels": 3, **fields,
            "num_hidden_layers": fields["num_hidden_layers"] + 1}


def config_json(config: BagelConfig) -> dict[str, Any]:
    top = {name: getattr(config, name) for name in _TOP_FIELDS}
    return {"visual_gen": True, "visual_und": True, **top,
            "vae_config": dataclasses.asdict(config.vae)}


def write_tiny_checkpoint(directory: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """The whole checkpoint of `preset` at `directory` (which must not exist or be empty);
    written into a temporary sibling renamed at the end, so a failure leaves nothing."""
    from mstar_bagel.autoencoder import Decoder, Encoder
    from mstar_bagel.llm import BagelLLM
    from mstar_bagel.vit import BagelViT

    if preset not in PRESETS or preset == "7b":
        raise ValueError(f"unknown small preset {preset!r}; presets: tiny, small")
    config = BagelConfig(**PRESETS[preset])
    out = Path(directory)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    gen = torch.Generator().manual_seed(seed)
    llm = BagelLLM(config.llm, latent_dim=config.latent_dim,
                   max_latent_size=config.max_latent_size)
    vit = BagelViT(config.vit, config.llm.hidden_size, config.vit_max_num_patch_per_side,
                   connector_act=config.connector_act)
    ema = {}
    for name, value in _weights(llm, gen).items():
        top = name.split(".")[0]
        ema[name if top in ("vae2llm", "llm2vae", "time_embedder", "latent_pos_embed")
            else f"language_model.{name}"] = value
    ema.update(_weights(vit, gen))
    ae = {**_weights(Encoder(config.vae), gen, "encoder."),
          **_weights(Decoder(config.vae), gen, "decoder.")}
    tmp = Path(tempfile.mkdtemp(prefix=".bagel-", dir=out.parent if out.parent.exists()
                                else None))
    try:
        save_file(ema, str(tmp / "ema.safetensors"))
        save_file(ae, str(tmp / "ae.safetensors"))
        for name, data in (("llm_config.json", llm_config_json(config)),
                           ("vit_config.json", vit_config_json(config)),
                           ("config.json", config_json(config))):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        write_tokenizer(tmp)
        if out.exists():
            out.rmdir()
        shutil.move(str(tmp), str(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.directory, args.preset, args.seed))


if __name__ == "__main__":
    main()
