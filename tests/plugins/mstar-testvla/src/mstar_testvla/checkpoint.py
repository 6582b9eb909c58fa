"""The checkpoint layout (hub style: one `model.safetensors` + `config.json`) and a writer of
seeded random checkpoints in it.

The text expert's keys are exactly Llama's; the action/media expert uses BAGEL's
`_moe_gen` suffixes; the other parts have their own prefixes (`vision_model.`,
`connector.`, `consumer.`, and top-level projections). `write_tiny_checkpoint` is what the
oracle, reference and runtime tests load, so every test reads the same files through the
same loader a real checkpoint would go through.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from mstar_testvla.config import PRESETS, TestVLAConfig


def checkpoint_shapes(cfg: TestVLAConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key and its shape."""
    h, eh, d = cfg.hidden_size, cfg.expert_hidden, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for suffix, width, inter in (("", h, cfg.intermediate_size),
                                     ("_moe_gen", eh, cfg.expert_intermediate)):
            shapes.update({
                f"{p}self_attn.q_proj{suffix}.weight": (q, width),
                f"{p}self_attn.k_proj{suffix}.weight": (kv, width),
                f"{p}self_attn.v_proj{suffix}.weight": (kv, width),
                f"{p}self_attn.o_proj{suffix}.weight": (width, q),
                f"{p}mlp{suffix}.gate_proj.weight": (inter, width),
                f"{p}mlp{suffix}.up_proj.weight": (inter, width),
                f"{p}mlp{suffix}.down_proj.weight": (width, inter),
                f"{p}input_layernorm{suffix}.weight": (width,),
                f"{p}post_attention_layernorm{suffix}.weight": (width,),
            })
    shapes.update({"model.norm.weight": (h,), "model.norm_moe_gen.weight": (eh,),
                   "lm_head.weight": (cfg.vocab_size, h)})

    def linear(name: str, n_in: int, n_out: int) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    linear("action_in_proj", cfg.action_dim, eh)
    linear("time_mlp_in", eh, eh)
    linear("time_mlp_out", eh, eh)
    linear("action_out_proj", eh, cfg.action_dim)
    linear("frame_in_proj", cfg.frame_dim, h)
    linear("frame_out_proj", h, cfg.frame_dim)
    vh = cfg.vision_hidden
    linear("vision_model.patch_embed", 3 * cfg.patch_size ** 2, vh)
    shapes["vision_model.block.norm1.weight"] = (vh,)
    shapes["vision_model.block.norm2.weight"] = (vh,)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        linear(f"vision_model.block.attn.{name}", vh, vh)
    linear("vision_model.block.mlp.fc1", vh, cfg.vision_intermediate)
    linear("vision_model.block.mlp.fc2", cfg.vision_intermediate, vh)
    shapes["vision_model.post_norm.weight"] = (vh,)
    linear("connector", vh, eh)
    shapes["consumer.code_embed.weight"] = (cfg.vocab_size, cfg.code_dim)
    linear("consumer.hidden_proj", h, cfg.code_dim)
    shapes["consumer.conv.weight"] = (cfg.code_dim, cfg.code_dim, cfg.consumer_kernel)
    shapes["consumer.conv.bias"] = (cfg.code_dim,)
    linear("consumer.out", cfg.code_dim, cfg.samples_per_unit)
    return shapes


def _init(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scales that keep activations O(1), so outputs differ clearly between tokens."""
    x = torch.randn(shape, generator=gen)
    if "norm" in key.rsplit(".", 2)[-2]:
        return 1.0 + 0.1 * x
    if key.endswith(".bias"):
        return 0.1 * x
    if key.endswith(("embed_tokens.weight", "code_embed.weight")):
        return x
    return x / math.sqrt(math.prod(shape[1:]))


def write_tiny_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write seeded random weights of `preset` to `path/model.safetensors` and its
    `config.json`; returns the directory."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    cfg = TestVLAConfig(**PRESETS[preset])
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {key: _init(key, shape, gen).contiguous()
               for key, shape in checkpoint_shapes(cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    return out
