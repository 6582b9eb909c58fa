"""Seeded random Pi0.5 checkpoints in lerobot's layout, so tests and benchmarks load a
checkpoint through the same loader and host-file path a real one takes.

A directory written by `write_checkpoint` holds what `lerobot/pi05_base` holds:
- `model.safetensors`: lerobot's keys (`paligemma_with_expert.paligemma.model.{vision_tower,
  multi_modal_projector,language_model}.*`, `paligemma_with_expert.paligemma.lm_head.weight`
  standing for the tied token embedding, which is left out as safetensors leaves out a
  shared tensor's second name, `paligemma_with_expert.gemma_expert.*` with adaRMS `dense`
  norms, `action_in_proj`, `action_out_proj`, `time_mlp_in`, `time_mlp_out`);
- `config.json`: lerobot's `PI05Config` fields, plus `mstar_sizes` (see `config.py`) since
  lerobot keeps the real sizes in code;
- the processor pipelines `policy_preprocessor.json` / `policy_postprocessor.json` with
  their normaliser statistics (`policy_preprocessor_step_3_normalizer_processor.
  safetensors`, `policy_postprocessor_step_0_unnormalizer_processor.safetensors`; keys
  `observation.state.q01`, `action.q99`, ...), quantiles far from [-1, 1] so that
  normalising matters;
- `tokenizer/tokenizer.json`: the packaged tiny tokenizer, in the subfolder named after
  the model's "tokenizer" weight source, where a local checkpoint keeps another source's
  files (lerobot's checkpoints ship no tokenizer).

`python -m mstar_pi05.checkpoint DIR [--preset tiny] [--seed 0]`, then
`mstar serve pi05 --config pi05_tiny --model-path DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mstar_pi05.config import (
    ACTION_FEATURE,
    IMAGE_FEATURE_PREFIX,
    PRESETS,
    STATE_FEATURE,
    Pi05Config,
    sizes_entry,
)
from mstar_pi05.processing import (
    NORMALIZER_STEP,
    POSTPROCESSOR,
    PREPROCESSOR,
    UNNORMALIZER_STEP,
)
from mstar_pi05.tokenizer import PACKAGED_TOKENIZER

PALIGEMMA = "paligemma_with_expert.paligemma."
EXPERT = "paligemma_with_expert.gemma_expert."
PRE_STATS = f"{PREPROCESSOR.removesuffix('.json')}_step_3_{NORMALIZER_STEP}.safetensors"
POST_STATS = f"{POSTPROCESSOR.removesuffix('.json')}_step_0_{UNNORMALIZER_STEP}.safetensors"


def checkpoint_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Every key of lerobot's `model.safetensors` for `cfg`'s sizes, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    v, p = cfg.vision, cfg.paligemma
    tower = f"{PALIGEMMA}model.vision_tower.vision_model."
    shapes[f"{tower}embeddings.patch_embedding.weight"] = (v.hidden_size, 3, v.patch_size,
                                                           v.patch_size)
    shapes[f"{tower}embeddings.patch_embedding.bias"] = (v.hidden_size,)
    shapes[f"{tower}embeddings.position_embedding.weight"] = (cfg.tokens_per_image,
                                                              v.hidden_size)
    for i in range(v.num_hidden_layers):
        layer = f"{tower}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = shapes[f"{layer}{norm}.bias"] = (v.hidden_size,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{layer}self_attn.{proj}", v.hidden_size, v.hidden_size)
        linear(f"{layer}mlp.fc1", v.hidden_size, v.intermediate_size)
        linear(f"{layer}mlp.fc2", v.intermediate_size, v.hidden_size)
    shapes[f"{tower}post_layernorm.weight"] = shapes[f"{tower}post_layernorm.bias"] = (
        v.hidden_size,)
    linear(f"{PALIGEMMA}model.multi_modal_projector.linear", v.hidden_size, p.width)
    shapes[f"{PALIGEMMA}lm_head.weight"] = (cfg.vocab_size, p.width)
    shapes[f"{EXPERT}lm_head.weight"] = (cfg.vocab_size, cfg.action_expert.width)
    for stack, size, adaptive in ((f"{PALIGEMMA}model.language_model.", p, False),
                                  (f"{EXPERT}model.", cfg.action_expert, True)):
        for i in range(size.depth):
            layer = f"{stack}layers.{i}."
            # the KV heads and head dim are the prefix's (the expert shares its cache layers)
            linear(f"{layer}self_attn.q_proj", size.width, size.num_heads * size.head_dim, False)
            for proj in ("k_proj", "v_proj"):
                linear(f"{layer}self_attn.{proj}", size.width, size.num_kv_heads * size.head_dim,
                       False)
            linear(f"{layer}self_attn.o_proj", size.num_heads * size.head_dim, size.width, False)
            linear(f"{layer}mlp.gate_proj", size.width, size.mlp_dim, False)
            linear(f"{layer}mlp.up_proj", size.width, size.mlp_dim, False)
            linear(f"{layer}mlp.down_proj", size.mlp_dim, size.width, False)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                _norm(shapes, f"{layer}{norm}", size.width, adaptive)
        _norm(shapes, f"{stack}norm", size.width, adaptive)
    e = cfg.action_expert.width
    linear("action_in_proj", cfg.max_action_dim, e)
    linear("action_out_proj", e, cfg.max_action_dim)
    linear("time_mlp_in", e, e)
    linear("time_mlp_out", e, e)
    return shapes


def _norm(shapes: dict[str, tuple[int, ...]], name: str, width: int, adaptive: bool) -> None:
    """Gemma's RMSNorm weight, or the expert's adaRMS `dense` (scale, shift, gate)."""
    if adaptive:
        shapes[f"{name}.dense.weight"] = (3 * width, width)
        shapes[f"{name}.dense.bias"] = (3 * width,)
    else:
        shapes[f"{name}.weight"] = (width,)


def _init(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scales that keep activations O(1), so outputs differ clearly between inputs."""
    x = torch.randn(shape, generator=gen)
    if "layer_norm" in key or "post_layernorm" in key:  # SigLIP's LayerNorm
        return 1.0 + 0.1 * x if key.endswith(".weight") else 0.1 * x
    if key.endswith("layernorm.weight") or key.endswith("norm.weight"):  # Gemma's 1 + w
        return 0.1 * x
    if key.endswith(".bias") or key.endswith("position_embedding.weight"):
        return 0.1 * x
    return x / math.sqrt(math.prod(shape[1:]))


def lerobot_config(cfg: Pi05Config) -> dict[str, Any]:
    """config.json: lerobot's `PI05Config` fields for `cfg` (its defaults where the
    serving config has no say), with `mstar_sizes`."""
    visual = {f"{IMAGE_FEATURE_PREFIX}{cam}": {"type": "VISUAL",
                                               "shape": [3, *cfg.image_resolution]}
              for cam in cfg.cameras}
    return {
        "type": "pi05", "n_obs_steps": 1,
        "input_features": {**visual, STATE_FEATURE: {"type": "STATE",
                                                     "shape": [cfg.state_dim]}},
        "output_features": {ACTION_FEATURE: {"type": "ACTION", "shape": [cfg.action_dim]}},
        "device": "cpu", "use_amp": False, "push_to_hub": False, "repo_id": None,
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
        "dtype": "float32", "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.action_horizon, "max_state_dim": cfg.max_state_dim,
        "max_action_dim": cfg.max_action_dim, "num_inference_steps": cfg.num_inference_steps,
        "time_sampling_beta_alpha": 1.5, "time_sampling_beta_beta": 1.0,
        "time_sampling_scale": 0.999, "time_sampling_offset": 0.001,
        "min_period": cfg.min_period, "max_period": cfg.max_period,
        "use_relative_actions": False, "relative_exclude_joints": ["gripper"],
        "action_feature_names": None, "rtc_config": None,
        "image_resolution": list(cfg.image_resolution), "empty_cameras": 0,
        "tokenizer_max_length": cfg.tokenizer_max_length,
        "normalization_mapping": dict(cfg.normalization_mapping),
        "gradient_checkpointing": False, "compile_model": False,
        "compile_mode": "max-autotune", "freeze_vision_encoder": False,
        "train_expert_only": False,
        "mstar_sizes": sizes_entry(cfg),
    }


def normalizer_stats(cfg: Pi05Config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every statistic lerobot's dataset stats hold for the state and the actions, drawn so
    that a value's normalised form differs clearly from it (quantiles around [-3, 3])."""
    stats = {}
    for feature, dim in ((STATE_FEATURE, cfg.state_dim), (ACTION_FEATURE, cfg.action_dim)):
        lo = -1.0 - 2.0 * torch.rand(dim, generator=gen)
        hi = 1.0 + 2.0 * torch.rand(dim, generator=gen)
        mean = (lo + hi) / 2 + 0.1 * torch.randn(dim, generator=gen)
        stats |= {f"{feature}.q01": lo, f"{feature}.q99": hi,
                  f"{feature}.q10": 0.8 * lo, f"{feature}.q90": 0.8 * hi,
                  f"{feature}.min": 1.2 * lo, f"{feature}.max": 1.2 * hi,
                  f"{feature}.mean": mean, f"{feature}.std": (hi - lo) / 4}
    return stats


def _pipelines(cfg: Pi05Config) -> dict[str, dict[str, Any]]:
    """The two processor pipelines' JSON, as lerobot's `make_pi05_pre_post_processors`
    saves them."""
    config = lerobot_config(cfg)
    features = {**config["input_features"], **config["output_features"]}
    norm = {"eps": 1e-8, "norm_map": dict(cfg.normalization_mapping)}
    pre = [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "relative_actions_processor",
         "config": {"enabled": False, "exclude_joints": ["gripper"], "action_names": None}},
        {"registry_name": NORMALIZER_STEP, "config": {**norm, "features": features},
         "state_file": PRE_STATS},
        {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {}},
        {"registry_name": "tokenizer_processor",
         "config": {"max_length": cfg.tokenizer_max_length, "task_key": "task",
                    "padding_side": "right", "padding": "max_length", "truncation": True}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ]
    post = [
        {"registry_name": UNNORMALIZER_STEP,
         "config": {**norm, "features": config["output_features"]}, "state_file": POST_STATS},
        {"registry_name": "absolute_actions_processor", "config": {"enabled": False}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ]
    return {PREPROCESSOR: {"name": "policy_preprocessor", "steps": pre},
            POSTPROCESSOR: {"name": "policy_postprocessor", "steps": post}}


def write_checkpoint(directory: str | Path, config: Pi05Config, *, seed: int = 0) -> Path:
    """Seeded random weights and statistics of `config` in lerobot's layout at `directory`
    (see the module docstring); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {key: _init(key, shape, gen).contiguous()
               for key, shape in checkpoint_shapes(config).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(lerobot_config(config), indent=2) + "\n")
    for name, pipeline in _pipelines(config).items():
        (out / name).write_text(json.dumps(pipeline, indent=2) + "\n")
    stats = normalizer_stats(config, gen)
    save_file(stats, str(out / PRE_STATS))
    save_file({k: v for k, v in stats.items() if k.startswith(ACTION_FEATURE + ".")},
              str(out / POST_STATS))
    (out / "tokenizer").mkdir(exist_ok=True)
    shutil.copyfile(PACKAGED_TOKENIZER, out / "tokenizer" / "tokenizer.json")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mstar_pi05.checkpoint",
                                     description="Write a seeded random Pi0.5 checkpoint in "
                                                 "lerobot's layout.")
    parser.add_argument("directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dim", type=int, help="the robot's state width (default 32)")
    parser.add_argument("--action-dim", type=int,
                        help="the robot's action width (default 32)")
    args = parser.parse_args(argv)
    config = Pi05Config(**PRESETS[args.preset])
    robot = {k: v for k, v in (("state_dim", args.state_dim), ("action_dim", args.action_dim))
             if v is not None}
    print(write_checkpoint(args.directory, dataclasses.replace(config, **robot),
                           seed=args.seed))


if __name__ == "__main__":
    main()
