"""The CEM pieces and the `cem_score` join node, and the pose integration: against the
authors' `cem` and `compute_new_pose` (notebooks/utils/mpc_utils.py: their inputs, the noise
`cem` drew and their outputs are fixtures, conftest.py) with the same noise, and against the
formulas."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mstar_vjepa2.cem import (
    CEMScore,
    Momenta,
    initial_distribution,
    l1_scores,
    planned_actions,
    refit,
    sample_actions,
)
from mstar_vjepa2.pose import compute_new_pose

N, D = 4, 6  # tokens of a frame, latent width
MAXNORM = 0.05


class WorldModel:
    """A deterministic stand-in for the predictor (the planner's math is under test): the
    next frame moves by a fixed linear map of the last action."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(7, N * D, generator=gen)

    def __call__(self, frames: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        step = (actions[:, -1] @ self.w).view(-1, 1, N, D)
        return frames[:, -1:] + step, poses[:, -1:]


def plan(world: WorldModel, context: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor, *,
         topk: int, momenta: Momenta, close_gripper: int | None) -> torch.Tensor:
    """Our planner as a served plan runs it: each round the children sample from that
    round's `noise` [rounds, samples, horizon, 4] and roll out; `CEMScore` joins them."""
    score = CEMScore()
    env: dict[str, Any] = {"goal_latents": goal, "topk": topk, "maxnorm": MAXNORM,
                           "momentum_mean": momenta.mean, "momentum_std": momenta.std,
                           "momentum_mean_gripper": momenta.mean_gripper,
                           "momentum_std_gripper": momenta.std_gripper}
    _, samples, horizon, _ = noise.shape
    mean, std = initial_distribution(horizon, MAXNORM)
    for round_noise in noise:
        actions = sample_actions(mean, std, round_noise, MAXNORM, close_gripper)
        frames = context.expand(samples, 1, N, D)
        poses = torch.zeros(samples, 1, 7)
        for h in range(horizon):
            nxt, poses = world(frames, actions[:, :h + 1], poses)
            frames = torch.cat([frames, nxt], dim=1)
        out = score([env | {"final_latents": frames[:, -1], "actions": actions}])[0]
        env |= {"cem_mean": out["cem_mean"], "cem_std": out["cem_std"]}
        mean, std = out["cem_mean"], out["cem_std"]
    return out["plan_actions"]


def test_pose_matches_the_authors_compute_new_pose(authors: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(compute_new_pose(authors["pose.pose"], authors["pose.action"]),
                               authors["pose.new_pose"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("close_gripper", [None, 1])
def test_plan_matches_the_authors_cem_with_the_same_noise(
        authors: dict[str, torch.Tensor], authors_params: dict[str, Any],
        close_gripper: int | None) -> None:
    args = authors_params["cem"]
    assert close_gripper in args["close_gripper"]
    got = plan(WorldModel(args["world_seed"]), authors["cem.context"][0],
               authors["cem.goal"][0, 0], authors[f"cem.{close_gripper}.noise"],
               topk=args["topk"], momenta=Momenta(**args["momenta"]),
               close_gripper=close_gripper)
    torch.testing.assert_close(got, authors[f"cem.{close_gripper}.plan"], atol=1e-6, rtol=0)


def test_samples_are_clipped_with_zero_rotation() -> None:
    mean, std = initial_distribution(2, MAXNORM)
    torch.testing.assert_close(mean, torch.zeros(2, 4))
    torch.testing.assert_close(std, torch.tensor([[MAXNORM] * 3 + [1.0]] * 2))
    noise = torch.tensor([[[0.5, -3.0, 30.0, 0.2], [1.0, 0.0, -1.0, -2.0]]])
    a = sample_actions(mean, std, noise, MAXNORM)
    torch.testing.assert_close(a[0], torch.tensor([
        [0.025, -MAXNORM, MAXNORM, 0.0, 0.0, 0.0, 0.2],
        [MAXNORM, 0.0, -MAXNORM, 0.0, 0.0, 0.0, -0.75]]))
    closed = sample_actions(mean, std, noise, MAXNORM, close_gripper=1)
    assert closed[0, :, 6].tolist() == pytest.approx([0.2, 1.0])


def test_refit_blends_the_topk_mean_and_std_with_the_momenta() -> None:
    actions = torch.arange(4 * 7, dtype=torch.float32).view(4, 1, 7) / 10
    scores = torch.tensor([0.3, 0.1, 0.9, 0.2])  # top-2: candidates 1 and 3
    mean, std = torch.ones(1, 4), 2 * torch.ones(1, 4)
    m = Momenta(mean=0.25, std=0.5, mean_gripper=0.1, std_gripper=0.2)
    new_mean, new_std = refit(actions, scores, mean, std, topk=2, momenta=m)
    chosen = actions[[1, 3], 0][:, [0, 1, 2, 6]]
    keep = torch.tensor([0.25, 0.25, 0.25, 0.1])
    torch.testing.assert_close(new_mean[0], chosen.mean(0) * (1 - keep) + keep)
    keep = torch.tensor([0.5, 0.5, 0.5, 0.2])
    sd = (chosen[0] - chosen[1]).abs() / 2 ** 0.5  # unbiased std of two values
    torch.testing.assert_close(new_std[0], sd * (1 - keep) + 2 * keep)


def test_cem_score_scores_by_l1_to_the_goal_and_refits() -> None:
    gen = torch.Generator().manual_seed(3)
    goal = torch.randn(N, D, generator=gen)
    final = goal + torch.tensor([0.5, 0.1, 0.3, 0.05, 0.7])[:, None, None]
    mean, std = initial_distribution(2, MAXNORM)
    actions = sample_actions(mean, std, torch.randn(5, 2, 4, generator=gen), MAXNORM)
    out = CEMScore()([{"final_latents": final, "actions": actions, "goal_latents": goal,
                       "topk": 2, "maxnorm": MAXNORM}])[0]
    torch.testing.assert_close(l1_scores(final, goal), torch.tensor([0.5, 0.1, 0.3, 0.05, 0.7]))
    assert out["topk_indices"].tolist() == [3, 1]
    torch.testing.assert_close(out["best_actions"], actions[3])
    assert float(out["best_score"]) == pytest.approx(0.05)
    want_mean, want_std = refit(actions, l1_scores(final, goal), mean, std, 2)
    torch.testing.assert_close(out["cem_mean"], want_mean)
    torch.testing.assert_close(out["cem_std"], want_std)
    torch.testing.assert_close(out["plan_actions"], planned_actions(want_mean))
    for topk in (1, 6):  # one candidate's std is NaN; there are five
        with pytest.raises(ValueError, match=f"topk={topk} must be between 2 and the 5"):
            CEMScore()([{"final_latents": final, "actions": actions, "goal_latents": goal,
                         "topk": topk, "maxnorm": MAXNORM}])


def test_planned_gripper_rounds_small_values_to_zero() -> None:
    mean = torch.tensor([[0.01, 0.02, 0.03, 0.2], [0.0, 0.0, 0.0, -0.3]])
    got = planned_actions(mean)
    assert got[:, 6].tolist() == pytest.approx([0.0, -0.3])
    assert got[:, 3:6].abs().sum() == 0
