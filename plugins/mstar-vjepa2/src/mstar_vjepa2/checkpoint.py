"""Seeded random V-JEPA 2 checkpoints in the real layouts, so tests and benchmarks load a
checkpoint through the same loader a real one takes.

- `kind="hf"` (`vjepa2`): what a hub repo such as `facebook/vjepa2-vitl-fpc64-256` holds,
  `model.safetensors` with `VJEPA2Model`'s keys (`encoder.*`, `predictor.*`) and a
  `config.json` of `VJEPA2Config`'s fields.
- `kind="ac"` (`vjepa2_ac`): the authors' release `vjepa2-ac-vitg.pt`, one pickled dict
  `{"encoder": ..., "predictor": ...}` of tensors whose keys carry the DDP and wrapper
  prefixes `module.backbone.`, the encoder in the authors' names (`patch_embed.proj`,
  `blocks.N.attn.qkv` fused, `norm`); it loads with `torch.load(weights_only=True)`.

Tensors are drawn from one seeded generator in key order, at scales that keep activations
O(1), so outputs differ clearly between inputs.

`python -m mstar_vjepa2.checkpoint DIR --kind ac --preset tiny`, then
`mstar serve vjepa2_ac --config vjepa2_ac_tiny --preset tiny --model-path DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from mstar.model import BuildContext
from mstar_vjepa2.model import VJepa2, VJepa2AC

#: The file name of the authors' release (any `*.pt` in the directory loads).
AC_FILE = "vjepa2-ac-vitg.pt"
#: The wrappers the authors' training saved around each state dict (DDP, then the backbone).
AC_PREFIX = "module.backbone."
#: Encoder parameter names (the model's) -> the authors' (`vision_transformer.py`).
_AUTHORS_NAMES = (
    (r"embeddings\.patch_embeddings\.proj\.(.*)", r"patch_embed.proj.\1"),
    (r"layer\.(\d+)\.attention\.(qkv|proj)\.(.*)", r"blocks.\1.attn.\2.\3"),
    (r"layer\.(\d+)\.(.*)", r"blocks.\1.\2"),
    (r"layernorm\.(.*)", r"norm.\1"),
)


def _init(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(tuple(shape), generator=gen)
    if len(shape) == 1:  # norms' scales near 1, biases and the rest small
        return 1.0 + 0.1 * x if re.search(r"norm[^.]*\.weight$", key) else 0.1 * x
    return x / math.sqrt(math.prod(shape[1:]))


def _seeded(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: _init(k, v.shape, gen).contiguous() for k, v in sorted(state.items())}


def _authors_name(name: str) -> str:
    for pattern, replacement in _AUTHORS_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    raise ValueError(f"no authors' name for encoder parameter {name!r}")


def _state(model: VJepa2 | VJepa2AC, node: str) -> dict[str, torch.Tensor]:
    ctx = BuildContext(node, torch.device("cpu"), torch.float32)
    with torch.device("meta"):
        return model.build_submodule(node, ctx).state_dict()


def write_checkpoint(directory: str | Path, preset: str = "tiny",
                     kind: Literal["hf", "ac"] = "hf", seed: int = 0) -> Path:
    """Write a seeded checkpoint of `preset`'s sizes in `kind`'s layout into `directory`
    (created); returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    if kind == "hf":
        model = VJepa2(VJepa2.make_config(preset=preset))
        tensors = {f"{prefix}.{k}": v for node, prefix in (("video_encoder", "encoder"),
                                                           ("predictor", "predictor"))
                   for k, v in _seeded(_state(model, node), gen).items()}
        save_file(tensors, out / "model.safetensors")
        config = dataclasses.asdict(model.config) | {"model_type": "vjepa2",
                                                     "architectures": ["VJEPA2Model"]}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    elif kind == "ac":
        ac = VJepa2AC(VJepa2AC.make_config(preset=preset))
        encoder = {AC_PREFIX + _authors_name(k): v
                   for k, v in _seeded(_state(ac, "video_encoder"), gen).items()}
        predictor = {AC_PREFIX + k: v
                     for k, v in _seeded(_state(ac, "ac_predictor"), gen).items()}
        torch.save({"encoder": encoder, "predictor": predictor}, out / AC_FILE)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; kinds: hf, ac")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mstar_vjepa2.checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--kind", choices=("hf", "ac"), default="hf",
                        help="hf: a hub VJEPA2Model checkpoint (vjepa2); ac: the authors' "
                             "pickled V-JEPA 2-AC release (vjepa2_ac)")
    parser.add_argument("--preset", default="tiny", help="tiny or small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_checkpoint(args.directory, args.preset, args.kind, args.seed))


if __name__ == "__main__":
    main()
