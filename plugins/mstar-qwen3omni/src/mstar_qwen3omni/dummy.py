"""Dummy Code2Wav weights that decode to audible sound.

Generic dummy weights (norms 1, everything else normal(0, 0.02)) make Code2Wav's signal
vanish through its convolutions and leave only the last bias: a constant, silence. Here
every convolution and linear weight is drawn at unit gain (std 1/sqrt(fan-in)), biases
are zero, the code embeddings unit normal and the layer scales 1, so the signal keeps its
size through the stack; the last convolution (one output channel) gets a small gain that
puts the waveform near 0.1 RMS without clipping, at the tiny and small sizes alike
(measured on transformers' `Qwen3OmniMoeCode2Wav`, whose parameter names ours share).
"""

from __future__ import annotations

import torch

#: Gain of the waveform's convolution: about 0.1 RMS at every preset's width.
OUTPUT_GAIN = 0.004


def audible_code2wav(name: str, weight: torch.Tensor, generator: torch.Generator
                     ) -> torch.Tensor:
    """The dummy value of Code2Wav parameter `name` (any prefix) of `weight`'s shape."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros_like(weight)
    if leaf in ("scale", "gamma"):
        return torch.ones_like(weight)
    if weight.dim() < 2 or "norm" in name:
        return weight
    draw = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    if "embedding" in name:
        return draw.to(weight.dtype)
    gain = OUTPUT_GAIN if weight.shape[0] == 1 and "conv" in name else 1.0
    return (draw * gain / weight[0].numel() ** 0.5).to(weight.dtype)
