"""Gated MLP (SwiGLU / GeGLU): down_proj(act(gate_proj(x)) * up_proj(x)), tensor-parallel.

gate/up are column-parallel (each rank holds a slice of the intermediate features) and
down is row-parallel, so one all-reduce per MLP. The three projections stay separate
modules so Hugging Face keys (`gate_proj.weight`, …) load without renaming.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.layers.linear import ColumnParallelLinear, RowParallelLinear

#: Activations by the names checkpoints' configs use (`hidden_act`); `gelu_pytorch_tanh` is
#: Hugging Face's name for the tanh approximation (SigLIP, BAGEL's connector).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, act: str = "silu",
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; supported: {sorted(ACTIVATIONS)}")
        self.act_name, self.act = act, ACTIVATIONS[act]
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias, **tp)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias, **tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, **tp)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's summand of the output (no collective)."""
        h = self.act(self.gate_proj.local_forward(x)) * self.up_proj.local_forward(x)
        return self.down_proj.local_forward(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"
