"""BAGEL's flow-matching sampler as two stateless nodes around the LLM's denoising steps.

`latent_init` draws the starting noise of each image (a core service, `ctx.randn`, so it
does not depend on batching or placement). `combine_cfg` takes the velocities of the three
guidance contexts for one step (the full context, the one without the last text, the one
without the images), mixes them as the authors' `_forward_flow` does (text guidance, then
image guidance, then a norm-preserving rescale), and takes one Euler step down the shifted
time schedule. A branch the graph skipped (outside `cfg_interval`, or a scale of 1) is
absent from the item, and its guidance term is then left out, as the authors' code does.
A prompt without images has an image-free context equal to the full one: that branch is
not run and the full context's velocity stands in for it (`cfg_img_is_full`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mstar.model import StepContext

Items = list[dict[str, Any]]


def timesteps(num_timesteps: int, shift: float) -> list[float]:
    """The flow times t_0 = 1 > t_1 > … > t_{num_timesteps-1} = 0, shifted toward the noise
    end: t ← shift·s / (1 + (shift − 1)·s) of s evenly spaced from 1 to 0. A request takes
    num_timesteps − 1 Euler steps, from t_i to t_{i+1}."""
    s = torch.linspace(1, 0, num_timesteps, dtype=torch.float32)
    return (shift * s / (1 + (shift - 1) * s)).tolist()


def guidance_active(env: Mapping[str, Any], step: int) -> bool:
    """Whether step `step` uses classifier-free guidance at all: its time (of the request's
    `timesteps`) is inside `cfg_interval` (lo < t ≤ hi) and text guidance is on (the
    authors' code applies image guidance only on top of text guidance)."""
    t = env["timesteps"][step]
    lo, hi = env["cfg_interval"]
    return lo < t <= hi and float(env["cfg_text_scale"]) > 1.0


class LatentInit(nn.Module):
    """Each item: `x_t` = keyed Gaussian noise [num_latent_tokens, latent_dim] (site
    "noise")."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, items: Items, ctx: StepContext) -> Items:
        out = []
        for i, item in enumerate(items):
            noise = ctx.randn(i, (int(item["num_latent_tokens"]), self.latent_dim), "noise")
            out.append({"x_t": noise})
        return out


def _norm(v: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.norm(v) if kind == "global" else torch.norm(v, dim=-1, keepdim=True)


def guided_velocity(v: torch.Tensor, v_text: torch.Tensor | None, v_img: torch.Tensor | None,
                    *, text_scale: float, img_scale: float, renorm_type: str,
                    renorm_min: float) -> torch.Tensor:
    """The velocity of one step from the full context's `v` and, when those branches ran, the
    text-free (`v_text`) and image-free (`v_img`) contexts' velocities.

    `text_channel` rescales the text-guided velocity per token before image guidance;
    `global` / `channel` rescale the final mix over all values / per token. Rescaling only
    shrinks (scale clamped to [renorm_min, 1])."""
    if v_text is None:
        return v
    mixed = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        scale = (_norm(v, "channel") / (_norm(mixed, "channel") + 1e-8)).clamp(renorm_min, 1.0)
        mixed = mixed * scale
        return mixed if v_img is None else v_img + img_scale * (mixed - v_img)
    if v_img is not None:
        mixed = v_img + img_scale * (mixed - v_img)
    scale = (_norm(v, renorm_type) / (_norm(mixed, renorm_type) + 1e-8)).clamp(renorm_min, 1.0)
    return mixed * scale


def _latent_rows(velocity: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The latent tokens' rows of an image chunk's velocity (without its two markers)."""
    return None if velocity is None else velocity[1:-1].to(dtype)


class CombineCFG(nn.Module):
    """One Euler step per item, step i of its `timesteps` (the denoise loop's iteration):
    x ← x − v·(t_i − t_{i+1}), v from `guided_velocity` over the latent rows (the LLM's
    `velocity` covers the whole image chunk, whose first and last rows are the image's start
    and end markers)."""

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        out = []
        for item in items:
            step, ts, x = int(item["step"]), item["timesteps"], item["x_t"]
            v_full, v_text, v_img = (_latent_rows(item.get(name), x.dtype) for name in (
                "velocity", "velocity_cfg_text", "velocity_cfg_img"))
            assert v_full is not None
            if v_img is None and item.get("cfg_img_is_full"):
                v_img = v_full  # the image-free context is the full one: same velocity
            v = guided_velocity(
                v_full, v_text, v_img,
                text_scale=float(item["cfg_text_scale"]), img_scale=float(item["cfg_img_scale"]),
                renorm_type=str(item["cfg_renorm_type"]),
                renorm_min=float(item["cfg_renorm_min"]))
            out.append({"x_t": x - v * (ts[step] - ts[step + 1])})
        return out
