"""Seeded random weights of the real shapes (`--load-format dummy`).

Rule, per parameter (tied parameters once, under their first name):
- the weight of an `RMSNorm` is set so its scale is 1 (1 − offset: 1 for Llama-style, 0 for
  Gemma-style); the weight of `nn.LayerNorm`/`nn.GroupNorm`, and any parameter whose name
  ends in `norm.weight`, is 1;
- every other parameter (matrices, embeddings, biases) is normal(0, 0.02);
- then the model may rework the tensor (`Model.adjust_dummy_weight`, passed as `adjust`),
  so that random weights still show its kind of output (a TTS model that speaks).
The FULL (unsharded) tensor is drawn from a `torch.Generator` seeded by (seed, parameter
name), adjusted, and then sharded exactly as the loader shards a checkpoint, so every TP
layout holds the same effective weights and outputs can be compared across placements.
Buffers are not touched: those not in checkpoints are recomputed by their module's
`reset_buffers()` (see `mstar.weights.materialize`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from mstar.model.layers.norm import RMSNorm
from mstar.weights.loader import assign, full_shape, shard_for_rank

STD = 0.02


def _name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from (seed, name); Python's hash() differs between processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _constant_fills(module: nn.Module) -> dict[str, float]:
    """Parameter name -> constant value for norm scales."""
    fills: dict[str, float] = {}
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(mod, RMSNorm):
            fills[f"{dot}weight"] = 1.0 - mod.offset
        elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) and mod.weight is not None:
            fills[f"{dot}weight"] = 1.0
    return fills


Adjust = Callable[[str, torch.Tensor, torch.Generator], torch.Tensor]


def init_dummy_weights(module: nn.Module, *, seed: int = 0, tp_rank: int = 0,
                       tp_size: int = 1, adjust: Adjust | None = None) -> list[str]:
    """Fill every parameter of `module` (rank `tp_rank` of `tp_size`) by the rule above;
    `adjust(name, full, generator)` may then rework each full tensor. The full tensors are
    drawn on the CPU (the same values on every device); returns the names filled."""
    fills = _constant_fills(module)
    names = []
    for name, param in module.named_parameters():
        shape = full_shape(param, tp_size)
        fill = fills.get(name, 1.0 if name.endswith("norm.weight") else None)
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        if fill is not None:
            full = torch.full(shape, fill)
        else:
            full = torch.randn(shape, generator=gen) * STD
        if adjust is not None:
            full = adjust(name, full, gen)
        assign(param, shard_for_rank(full, param, tp_rank, tp_size), None)
        names.append(name)
    return names
