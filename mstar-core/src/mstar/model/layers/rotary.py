"""Rotary position embedding (rotate-half convention of GPT-NeoX / HF Llama), 1-D or
multi-axis.

Multi-axis positions `[A, T]` (Qwen2-VL's M-RoPE: temporal, height, width) give each
frequency pair the position of one axis: `sections[a]` consecutive frequency pairs, in
frequency order, read axis a. `interleaved` (Qwen3-VL / Qwen3-Omni) instead deals the
frequencies round-robin, so every axis gets high and low frequencies: pair i reads axis
i mod A while that axis has pairs left (axis a > 0 owns pairs a, a + A, …, a + A·(sections[a]
− 1)), and axis 0 reads every other pair. With every axis equal either layout is exactly
1-D RoPE. cos/sin are computed from the positions at each call (no cache to size or
invalidate); that is a few elementwise ops on [T, D], small beside attention.

The buffers (`inv_freq`, `axis_of_freq`) are not in checkpoints: `reset_buffers` computes
them, at construction and again after the loader materialised a module built on the meta
device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, *, factor: float, low_freq_factor: float,
                     high_freq_factor: float, original_max_position_embeddings: int,
                     **_: Any) -> torch.Tensor:
    """Llama 3.1 context extension: wavelengths longer than `original / low_freq_factor`
    are stretched by `factor`, shorter than `original / high_freq_factor` kept, and those in
    between blended linearly in (original / wavelength)."""
    original = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > original / low_freq_factor, inv_freq / factor,
                       torch.where(wavelen < original / high_freq_factor, inv_freq, blended))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin in float32, where rotate_half(x1, x2) = (−x2, x1)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotates q [T, H, D] and k [T, KVH, D] by positions [T] or [A, T].

    `rope_scaling`: None (or rope_type "default") or a Llama-3 dict
    (`{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`). `sections`: frequency pairs per position axis
    (sum D/2) for multi-axis positions, chunked or (`interleaved`) round-robin.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *,
                 rope_scaling: dict[str, Any] | None = None,
                 sections: tuple[int, ...] | None = None, interleaved: bool = False):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        scaling = dict(rope_scaling or {})
        # Older HF configs name the type "type"; both keys are dropped here.
        self.rope_type = scaling.pop("rope_type", scaling.pop("type", None))
        self.rope_args = scaling
        if self.rope_type not in (None, "default", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r}; "
                             "supported: None, 'default', 'llama3'")
        self.sections = tuple(sections) if sections is not None else None
        if self.sections is not None and (sum(self.sections) != head_dim // 2
                                          or min(self.sections) < 0):
            raise ValueError(f"rotary sections {self.sections} must be non-negative and "
                             f"sum to head_dim/2 = {head_dim // 2}")
        self.interleaved = interleaved
        if interleaved and (self.sections is None or any(
                a + len(self.sections) * (n - 1) >= head_dim // 2
                for a, n in enumerate(self.sections) if a and n)):
            raise ValueError(f"interleaved rotary needs sections whose pairs a + A·k fit in "
                             f"head_dim/2 = {head_dim // 2}, got {self.sections}")
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        if self.sections is not None:
            self.register_buffer("axis_of_freq", torch.empty(head_dim // 2, dtype=torch.long),
                                 persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the buffers into place (on their device, in their dtype). The values are
        computed on the CPU in float32, so every device gets the same frequencies."""
        cpu = torch.device("cpu")
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float,
                                                     device=cpu) / self.head_dim))
        if self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, **self.rope_args)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)
            if self.sections is not None:
                self.axis_of_freq.copy_(self._axis_of_freq())

    def _axis_of_freq(self) -> torch.Tensor:
        """The position axis every frequency pair reads, [D/2]."""
        if not self.interleaved:
            return torch.tensor([axis for axis, n in enumerate(self.sections) for _ in range(n)],
                                dtype=torch.long)
        axes = len(self.sections)
        axis_of = torch.zeros(self.head_dim // 2, dtype=torch.long)
        for axis, n in enumerate(self.sections[1:], start=1):
            axis_of[axis:axis + axes * n:axes] = axis
        return axis_of

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angle of every (token, frequency pair), [T, D/2], in float32. 1-D
        positions serve multi-axis models too (text tokens: every axis equal)."""
        pos = positions.float()
        if pos.dim() == 1:
            return pos[:, None] * self.inv_freq
        if self.sections is None or pos.dim() != 2 or pos.shape[0] != len(self.sections):
            raise ValueError(f"positions of shape {tuple(positions.shape)} need [T], or [A, T] "
                             f"with A = len(sections) (sections={self.sections})")
        return pos[self.axis_of_freq].T * self.inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] for `positions`: compute once per forward, `apply` in
        every layer."""
        emb = torch.cat([self._angles(positions)] * 2, dim=-1)[:, None, :]
        return emb.cos(), emb.sin()

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(q, k, self.cos_sin(positions))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base}, sections={self.sections}, "
                f"interleaved={self.interleaved}")
