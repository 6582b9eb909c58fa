"""Model-predictive control against a served V-JEPA 2-AC world model: observe the scene,
plan actions toward a goal image (the server's cross-entropy method over rollouts of its
action-conditioned predictor), apply the first planned action, repeat.

    mstar serve vjepa2_ac --preset tiny --load-format dummy     # in another shell
    python examples/vjepa2_mpc_loop.py [--steps 4] [--samples 32] [--iterations 3]

The environment here is synthetic: an end-effector pose (x, y, z, roll, pitch, yaw,
gripper) drawn as a coloured disc on a camera image; a real robot gives its camera frame
and pose instead. `MSTAR_URL` picks the server (default http://localhost:8000) and
`MSTAR_API_KEY` the key, if it has one. With the tiny model's random weights the plan does
not reach the goal: the script shows the loop and the calls, not a trained policy.
"""

import argparse
import os
import time

import numpy as np

from mstar import MStarClient

SIDE = 64


class PointerWorld:
    """A gripper seen from above: its x, y move a disc, z sets its size, the gripper its
    colour. `step` applies an action as a pose delta, as the DROID actions of V-JEPA 2-AC
    are: positions and the gripper add (the gripper clipped to [0, 1]) as the server
    integrates them in its rollouts; the planner leaves rotations at zero."""

    def __init__(self, pose: np.ndarray):
        self.pose = pose.astype(np.float32)

    def render(self) -> np.ndarray:
        """The camera frame, uint8 [H, W, 3]."""
        x, y, z, *_, grip = self.pose
        yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
        disc = (xx - 0.5 - x) ** 2 + (yy - 0.5 - y) ** 2 < (0.08 + 0.1 * z) ** 2
        frame = np.full((SIDE, SIDE, 3), 40, np.uint8)
        frame[disc] = (220, int(200 * (1 - grip)), int(200 * grip))
        return frame

    def step(self, action: np.ndarray) -> None:
        self.pose[:6] += action[:6]
        self.pose[6] = np.clip(self.pose[6] + action[6], 0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="control steps")
    parser.add_argument("--samples", type=int, default=32, help="CEM samples per iteration")
    parser.add_argument("--iterations", type=int, default=3, help="CEM iterations")
    parser.add_argument("--horizon", type=int, default=2, help="planned steps per plan")
    parser.add_argument("--topk", type=int, default=4, help="CEM elites")
    args = parser.parse_args()

    goal_pose = np.array([0.15, -0.1, 0.2, 0, 0, 0, 1.0], np.float32)
    goal = PointerWorld(goal_pose).render()[None]  # one goal frame
    world = PointerWorld(np.array([-0.1, 0.1, 0.0, 0, 0, 0, 0.0]))
    url = os.environ.get("MSTAR_URL", "http://localhost:8000")
    with MStarClient(url) as client:
        goal_latents = client.encode_video(goal)
        print(f"goal latents: shape {list(goal_latents.shape)}")
        for t in range(args.steps):
            frame = world.render()[None]  # observe: the current frame, [1, H, W, 3]
            start = time.perf_counter()
            planned = client.plan(video=frame, goal=goal, states=world.pose[None],
                                  samples=args.samples, iterations=args.iterations,
                                  horizon=args.horizon, topk=args.topk, seed=t)
            took = time.perf_counter() - start
            world.step(planned[0])  # apply the first action only, then observe again
            latent_gap = np.abs(client.encode_video(world.render()[None]) - goal_latents)
            print(f"step {t}: planned {list(planned.shape)} in {took:.2f} s, applied "
                  f"{[round(float(a), 3) for a in planned[0]]}, pose error "
                  f"{np.abs(world.pose - goal_pose)[:3].sum():.3f}, latent L1 to goal "
                  f"{latent_gap.mean():.4f}")
        # the world model's own forecast of the next steps under the last plan
        forecast = client.rollout(video=world.render()[None], actions=planned,
                                  states=world.pose[None])
        print(f"forecast: {forecast.shape[0]} steps of {list(forecast.shape[1:])} latents")


if __name__ == "__main__":
    main()
