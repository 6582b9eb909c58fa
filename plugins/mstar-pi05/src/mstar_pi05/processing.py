"""Pi0.5's host-side input and output processing, as lerobot 0.6.1 computes it.

- Images (`pixels`): a uint8 RGB picture as float in [0, 1], resized with padding to the
  config's resolution (openpi's `resize_with_pad_torch`: bilinear to fit, then centred
  black bars), then `*2-1` for SigLIP.
- Normalisation (`Normalizer`): the statistics and modes of the checkpoint's processor
  pipelines: `policy_preprocessor.json`'s `normalizer_processor` step (the state) and
  `policy_postprocessor.json`'s `unnormalizer_processor` step (the actions), each with its
  `state_file` of statistics keyed `<feature>.<stat>` (`observation.state.q01`,
  `action.q99`). Modes and formulas are `NormalizerProcessorStep`'s, eps included.
- The prompt (`prompt_text`): `Pi05PrepareStateTokenizerProcessorStep`'s: the normalised
  state in 256 bins over [-1, 1] written as decimal text after the cleaned task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mstar_pi05.config import ACTION_FEATURE, STATE_FEATURE

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
#: lerobot's registry names of the steps holding the statistics.
NORMALIZER_STEP, UNNORMALIZER_STEP = "normalizer_processor", "unnormalizer_processor"
RELATIVE_STEP = "relative_actions_processor"
#: lerobot's feature type of each feature we normalise.
FEATURE_TYPES = {STATE_FEATURE: "STATE", ACTION_FEATURE: "ACTION"}
#: The statistics each mode reads (lower bound, upper bound), or mean and std.
MODE_STATS = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"),
              "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
STATE_BINS = 256


def pixels(image: Image, resolution: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] float in [-1, 1] for SigLIP at `resolution` (H, W)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(rgb.copy()).float().div(255.0).permute(2, 0, 1)[None]
    if tuple(x.shape[2:]) != tuple(resolution):
        x = resize_with_pad(x, *resolution)
    return x[0] * 2.0 - 1.0


def resize_with_pad(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, h, w] floats in [0, 1] resized to fit (height, width) keeping the aspect ratio
    (bilinear; sizes truncated, as openpi's), clamped to [0, 1], centred on zero bars."""
    cur_h, cur_w = images.shape[2:]
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear",
                            align_corners=False).clamp(0.0, 1.0)
    top, extra_h = divmod(height - new_h, 2)
    left, extra_w = divmod(width - new_w, 2)
    return F.pad(resized, (left, left + extra_w, top, top + extra_h), value=0.0)


def prompt_text(task: str, normalized_state: torch.Tensor) -> str:
    """`Task: {task}, State: {bins};\\nAction: ` with the task stripped, `_` and newlines as
    spaces, and each state value's bin among 256 equal ones over [-1, 1] (values outside
    fall in bins -1 and 255, as np.digitize puts them)."""
    edges = np.linspace(-1, 1, STATE_BINS + 1)[:-1]
    bins = np.digitize(normalized_state.float().numpy(), bins=edges) - 1
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: "


@dataclass(frozen=True)
class FeatureNorm:
    """One feature's normalisation: `mode` and its two statistics (`lo`, `hi`: bounds, or
    mean and std), each [dim] float32; `mode` None is the identity."""

    mode: str | None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    eps: float = 1e-8

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return x
        lo, hi = self._stats(x)
        if self.mode == "MEAN_STD":
            return (x - lo) / (hi + self.eps)
        return 2.0 * (x - lo) / self._span(lo, hi) - 1.0

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return x
        lo, hi = self._stats(x)
        if self.mode == "MEAN_STD":
            return x * hi + lo
        return (x + 1.0) * self._span(lo, hi) / 2.0 + lo

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of x's leading dims (a robot may send fewer than the checkpoint's)."""
        assert self.lo is not None and self.hi is not None
        n = x.shape[-1]
        return self.lo[:n].to(x), self.hi[:n].to(x)

    def _span(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        span = hi - lo
        return torch.where(span == 0, torch.tensor(self.eps, dtype=span.dtype), span)


IDENTITY = FeatureNorm(None)


@dataclass(frozen=True)
class Normalizer:
    """The state's normalisation and the actions' (see the module docstring)."""

    state: FeatureNorm = IDENTITY
    action: FeatureNorm = IDENTITY

    @classmethod
    def from_directory(cls, directory: Path | None) -> Normalizer:
        """The processor files' statistics in `directory`; identity (logged) without them.
        ValueError for a checkpoint trained on actions relative to the state (lerobot's
        `use_relative_actions`), whose answers would need the state added back."""
        relative = _step(directory, PREPROCESSOR, RELATIVE_STEP)
        if relative is not None and relative.config.get("enabled"):
            raise ValueError(f"{relative.file}: this checkpoint predicts actions relative to "
                             "the state (use_relative_actions), which pi05 does not serve")
        pre = _step(directory, PREPROCESSOR, NORMALIZER_STEP)
        post = _step(directory, POSTPROCESSOR, UNNORMALIZER_STEP)
        if pre is None and post is None:
            log.info("pi05: no normaliser statistics (%s / %s) in %s: state and actions are "
                     "used as they are (identity)", PREPROCESSOR, POSTPROCESSOR, directory)
        return cls(state=_feature_norm(pre, STATE_FEATURE),
                   action=_feature_norm(post, ACTION_FEATURE))


@dataclass(frozen=True)
class _Step:
    """A normaliser step of a processor pipeline: its config and its statistics."""

    file: Path
    config: Mapping
    stats: Mapping[str, torch.Tensor]


def _step(directory: Path | None, pipeline: str, registry_name: str) -> _Step | None:
    if directory is None or not (directory / pipeline).is_file():
        return None
    from safetensors.torch import load_file

    steps = json.loads((directory / pipeline).read_text()).get("steps", [])
    for step in steps:
        if step.get("registry_name") == registry_name:
            state_file = step.get("state_file")
            stats = load_file(str(directory / state_file)) if state_file else {}
            return _Step(directory / pipeline, step.get("config", {}), stats)
    return None


def _feature_norm(step: _Step | None, feature: str) -> FeatureNorm:
    """`feature`'s normalisation in `step`, as lerobot applies it: the identity when the
    step does not list the feature, its type's mode is IDENTITY or there are no statistics
    for it; ValueError when the mode's statistics are incomplete."""
    if step is None or feature not in step.config.get("features", {}):
        return IDENTITY
    mode = step.config.get("norm_map", {}).get(FEATURE_TYPES[feature], "IDENTITY")
    have = {key.removeprefix(feature + "."): value for key, value in step.stats.items()
            if key.rsplit(".", 1)[0] == feature}
    if mode == "IDENTITY" or not have:
        return IDENTITY
    if mode not in MODE_STATS:
        raise ValueError(f"{step.file}: unsupported normalisation mode {mode!r} for "
                         f"{feature}; supported: IDENTITY, {', '.join(MODE_STATS)}")
    lo_name, hi_name = MODE_STATS[mode]
    if lo_name not in have or hi_name not in have:
        raise ValueError(f"{step.file}: {mode} normalisation of {feature} needs the "
                         f"statistics {lo_name} and {hi_name}; the state file has "
                         f"{sorted(have)}")
    return FeatureNorm(mode, have[lo_name].float().reshape(-1),
                       have[hi_name].float().reshape(-1), float(step.config.get("eps", 1e-8)))
