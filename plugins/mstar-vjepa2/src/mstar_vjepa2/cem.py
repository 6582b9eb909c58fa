"""The authors' cross-entropy-method planner (notebooks/utils/mpc_utils.py `cem`) cut into
the pieces a served plan runs in different places: each candidate child samples its action
trajectory (`sample_actions`) and rolls it out; one `CEMScore` invocation then sees every
child of the round at once (core's walk `Join`), scores the final latents by L1 distance
to the goal's, keeps the top-k and refits the sampling distribution.

The distribution is over 4 numbers per horizon step: the xyz translation and the gripper
(`mean`, `std` [H, 4]); sampled actions are 7-D with zero rotation, as the authors'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: The authors' gripper action bounds (a sample's gripper is clipped to them).
GRIPPER_LIMIT = 0.75
#: A planned gripper action smaller than this in magnitude is rounded to 0.
GRIPPER_DEADBAND = 0.25


@dataclass(frozen=True)
class Momenta:
    """How much of the previous mean / std each refit keeps (translation, gripper). The
    defaults are the authors' planner's (world_model_wrapper.py mpc_args; `cem`'s own
    gripper defaults)."""

    mean: float = 0.15
    std: float = 0.15
    mean_gripper: float = 0.15
    std_gripper: float = 0.15


def initial_distribution(horizon: int, maxnorm: float, device: torch.device | str = "cpu"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [horizon, 4] of the first round: zero mean, std maxnorm on translation
    and 1 on the gripper."""
    mean = torch.zeros(horizon, 4, device=device)
    std = torch.cat([torch.full((horizon, 3), float(maxnorm), device=device),
                     torch.ones(horizon, 1, device=device)], dim=-1)
    return mean, std


def sample_actions(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor,
                   maxnorm: float, close_gripper: int | None = None) -> torch.Tensor:
    """Action trajectories [..., H, 7] from standard-normal `noise` [..., H, 4]: noise·std
    + mean, translation clipped to ±maxnorm, gripper to ±0.75, zero rotation; from step
    `close_gripper` on the gripper is 1 (closed)."""
    a = noise * std + mean
    xyz = a[..., :3].clamp(-maxnorm, maxnorm)
    gripper = a[..., 3:].clamp(-GRIPPER_LIMIT, GRIPPER_LIMIT)
    if close_gripper is not None:
        gripper = gripper.clone()
        gripper[..., close_gripper:, :] = 1.0
    return torch.cat([xyz, torch.zeros_like(xyz), gripper], dim=-1)


def l1_scores(final_latents: torch.Tensor, goal_latents: torch.Tensor) -> torch.Tensor:
    """Mean absolute distance of each candidate's final latents [S, ...] to the goal's
    [...] -> [S] (lower is closer)."""
    s = final_latents.shape[0]
    return (final_latents.reshape(s, -1) - goal_latents.reshape(1, -1)).abs().mean(-1)


def topk_indices(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the `topk` lowest scores, best first."""
    return scores.topk(topk, largest=False).indices


def refit(actions: torch.Tensor, scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
          topk: int, momenta: Momenta = Momenta()) -> tuple[torch.Tensor, torch.Tensor]:
    """The next round's (mean, std) [H, 4] from the candidates' `actions` [S, H, 7] and
    `scores` [S]: the top-k's mean and (unbiased) std, blended with the previous ones by
    the momenta (translation and gripper separately)."""
    chosen = actions[topk_indices(scores, topk)]
    m, s = chosen.mean(0), chosen.std(0)

    def blend(new: torch.Tensor, old: torch.Tensor, keep: float, keep_gripper: float
              ) -> torch.Tensor:
        return torch.cat([new[..., :3] * (1 - keep) + old[..., :3] * keep,
                          new[..., -1:] * (1 - keep_gripper) + old[..., -1:] * keep_gripper],
                         dim=-1)

    return (blend(m, mean, momenta.mean, momenta.mean_gripper),
            blend(s, std, momenta.std, momenta.std_gripper))


def planned_actions(mean: torch.Tensor) -> torch.Tensor:
    """The plan the authors return: the distribution's mean as 7-D actions [H, 7], zero
    rotation, gripper values under 0.25 in magnitude set to 0."""
    gripper = mean[..., -1:]
    gripper = torch.where(gripper.abs() < GRIPPER_DEADBAND, torch.zeros_like(gripper), gripper)
    return torch.cat([mean[..., :3], torch.zeros_like(mean[..., :3]), gripper], dim=-1)


class CEMScore(nn.Module):
    """The stateless node `cem_score`, run as a walk's `Join`: one item per request, its
    join environment. Reads `final_latents` [S, N, D] and `actions` [S, H, 7] (stacked
    over the S children), `goal_latents` [N, D], `topk`, `maxnorm` (for the first round's
    distribution), `cem_mean` / `cem_std` [H, 4] (absent in the first round) and optional
    `momentum_mean`, `momentum_std`, `momentum_mean_gripper`, `momentum_std_gripper`.
    Returns the refit `cem_mean` / `cem_std`, `topk_indices` [k], `best_actions` [H, 7]
    (the closest candidate's), `best_score` and `plan_actions` [H, 7] (`planned_actions`
    of the new mean: the authors' answer when this is the last round)."""

    def forward(self, items: list[dict[str, Any]], ctx: Any = None) -> list[dict[str, Any]]:
        return [self._one(item) for item in items]

    @staticmethod
    def _one(item: dict[str, Any]) -> dict[str, Any]:
        actions = torch.as_tensor(item["actions"])
        final = torch.as_tensor(item["final_latents"]).to(actions.device)
        goal = torch.as_tensor(item["goal_latents"]).to(device=actions.device, dtype=final.dtype)
        topk = int(item["topk"])
        if not 2 <= topk <= actions.shape[0]:  # one candidate has no std (NaN)
            raise ValueError(f"topk={topk} must be between 2 and the {actions.shape[0]} "
                             "candidates")
        if item.get("cem_mean") is None:
            mean, std = initial_distribution(actions.shape[1], float(item["maxnorm"]),
                                             actions.device)
        else:
            mean = torch.as_tensor(item["cem_mean"]).to(actions.device)
            std = torch.as_tensor(item["cem_std"]).to(actions.device)
        defaults = Momenta()
        momenta = Momenta(*(float(item.get(f"momentum_{n}", getattr(defaults, n)))
                            for n in ("mean", "std", "mean_gripper", "std_gripper")))
        scores = l1_scores(final, goal)
        best = topk_indices(scores, topk)
        mean, std = refit(actions, scores, mean, std, topk, momenta)
        return {"cem_mean": mean, "cem_std": std, "topk_indices": best,
                "best_actions": actions[best[0]], "best_score": scores[best[0]],
                "plan_actions": planned_actions(mean)}
