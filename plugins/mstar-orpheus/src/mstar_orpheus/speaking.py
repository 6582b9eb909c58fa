"""LM weights that speak, random as they are: a structure laid over any weights (a seeded
tiny checkpoint, or `--load-format dummy`) under which every token the LM samples is an
audio code of the right frame position. A random LM would say text tokens and the codec
nothing; with this, tests, benchmarks and the offline first run hear audio.

Hidden dims 0-6 name an audio token's frame position p, dims 7-13 a position a token
points to, dim 14 is a constant. An audio token of position p embeds as
A·(e_p + e_{7+p} + e_14); the start of speech, which precedes position 0, as A·(e_6 + e_14).
Layer 0's MLP adds about 10·A·e_{7+next(p)} (its gate reads the constant, so SiLU passes its
input on almost linearly); every other attention and MLP output projection is zero, so the
residual stream carries just that to the head. The head's row of an audio token is its
embedding (the same tensor when tied, the same rows when not), whose product with that
stream is largest, by far, for the tokens of position next(p). Code 0 of each band is left
out (the reference decoder skips a code 0, which would shift the frame positions). Small
noise on the rows makes the codes within a band random. Every forward still costs what it
costs: only values change, never shapes.
"""

from __future__ import annotations

import math

import torch

from mstar_orpheus.config import AUDIO_TOKEN_BASE, CODEBOOK_SIZE, CODES_PER_FRAME, START_OF_SPEECH

#: A (the scale of the structure in the token rows), the noise on them, layer 0's gate.
SCALE, NOISE, GATE = 4.0, 0.05, 10.0
POINTS_TO = CODES_PER_FRAME  # dims 7-13
CONSTANT = 2 * CODES_PER_FRAME  # dim 14
TOKEN_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def speaking_weight(name: str, weight: torch.Tensor, generator: torch.Generator
                    ) -> torch.Tensor:
    """The LM parameter `name` (the hub's names, full tensor) with the structure above laid
    over it; `generator` draws the rows' noise. Token rows are rewritten in place."""
    if name in TOKEN_ROWS:
        return _token_rows(weight, generator)
    if name.startswith("model.layers.0.mlp."):
        return _position_map(name, weight)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return torch.zeros_like(weight)
    return weight


def _token_rows(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    hidden = weight.shape[1]
    if hidden <= CONSTANT:
        raise ValueError(f"a speaking Orpheus needs hidden_size > {CONSTANT}, not {hidden}")
    end = AUDIO_TOKEN_BASE + CODES_PER_FRAME * CODEBOOK_SIZE
    rows = weight[AUDIO_TOKEN_BASE:end]
    rows.copy_(NOISE * torch.randn(rows.shape, generator=generator))
    bands = rows.view(CODES_PER_FRAME, CODEBOOK_SIZE, hidden)
    for position in range(CODES_PER_FRAME):
        bands[position, 1:, [position, POINTS_TO + position, CONSTANT]] += SCALE
    weight[START_OF_SPEECH] = NOISE * torch.randn(hidden, generator=generator)
    weight[START_OF_SPEECH, [CODES_PER_FRAME - 1, CONSTANT]] += SCALE
    return weight


def _position_map(name: str, weight: torch.Tensor) -> torch.Tensor:
    """Layer 0's MLP: e_p -> SiLU(GATE)·A·e_{7+next(p)} through units 0-6. Its input is
    normalised (RMS 1 over 3 dims of equal size: each is sqrt(hidden/3)), hence the
    scales: the gate is GATE, the up projection 1."""
    out = torch.zeros_like(weight)
    units = torch.arange(CODES_PER_FRAME)
    if name.endswith("down_proj.weight"):
        out[POINTS_TO + (units + 1) % CODES_PER_FRAME, units] = SCALE
        return out
    per_dim = math.sqrt(weight.shape[1] / 3)
    if name.endswith("gate_proj.weight"):
        out[units, CONSTANT] = GATE / per_dim
    elif name.endswith("up_proj.weight"):
        out[units, units] = 1 / per_dim
    return out
