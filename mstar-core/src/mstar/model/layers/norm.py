"""RMSNorm, computed in float32 whatever the activation dtype.

`offset` covers both conventions in checkpoints: Llama stores the scale itself (offset 0,
weight starts at 1); Gemma stores scale − 1 (offset 1, weight starts at 0).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x²) + eps) · (offset + weight), over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.dim, self.eps, self.offset = dim, eps, offset
        # Identity scale until weights are loaded: offset + weight == 1.
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, offset={self.offset}"
