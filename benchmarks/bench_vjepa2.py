"""V-JEPA 2-AC rollouts and plans: the time of a rollout of 1, 4 and 16 steps with the
persistent cache (mstar: each step appends one frame to the predictor's KV cache) against
the authors' way, which re-runs the predictor over the whole trajectory at every step
(their world_model_wrapper's `step_predictor` in a loop), as a ratio; and the wall time of
model-predictive control (a CEM plan of fixed samples and iterations) for 1 and for 8
planners at once.

Both sides run the same weights: the `small` preset written as the authors' checkpoint
file (`mstar_vjepa2.checkpoint`, their pickled `{"encoder", "predictor"}` layout), loaded by
mstar (`mstar.load(..., model_path=)`, in process, no HTTP) and by the authors' predictor
(`vit_ac_predictor` of the `cc-vjepa2` package, whose ac_predictor.py is the authors'
file). mstar's time is the whole request (the context frame encoded, then the steps); the
reference's only the predictor loop from the same context latents, so the ratio is a lower
bound. Each figure is the best of `--repeat` runs (the machine is shared: load only slows
a run).

    python benchmarks/bench_vjepa2.py            # a few minutes on 2 cores
    python benchmarks/bench_vjepa2.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mstar
from mstar import events
from mstar_vjepa2.ac_predictor import PRESETS, ACPredictorConfig
from mstar_vjepa2.checkpoint import AC_FILE, write_checkpoint
from mstar_vjepa2.pose import compute_new_pose

# the authors' module, as the plugin's tests load it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins/mstar-vjepa2/tests"))
from authors_code import authors_ac_predictor_from  # noqa: E402

CONFIG = "vjepa2_ac_tiny"  # one CPU rank; the preset sets the sizes
SIDE = 64


def best_of(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of `repeat` runs of `run`, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def recompute_rollout(predictor: torch.nn.Module, context: torch.Tensor, pose: torch.Tensor,
                      actions: torch.Tensor) -> torch.Tensor:
    """The authors' rollout from a context frame's layer-normed latents [tokens, dim]: at
    step h the predictor reads every frame so far (context and h predicted ones) with the
    actions and poses so far, the last frame's prediction is layer-normed and appended,
    the pose integrated from the action."""
    tokens, dim = context.shape
    reps, poses = context[None], pose
    with torch.no_grad():
        for h in range(actions.shape[0]):
            out = predictor(reps.flatten(0, 1)[None], actions[None, :h + 1], poses[None])[0]
            reps = torch.cat([reps, F.layer_norm(out[-tokens:], (dim,))[None]])
            poses = torch.cat([poses, compute_new_pose(poses[-1:], actions[h:h + 1])])
    return reps[1:]


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8)


def run(deployment: mstar.LocalDeployment, request: dict) -> list[events.Event]:
    out = list(deployment.generate(request))
    if not isinstance(out[-1], events.Finished) or out[-1].reason != "stop":
        raise RuntimeError(f"request failed: {out[-1]}")
    return out


def tensor_of(evs: list[events.Event], name: str) -> torch.Tensor:
    return torch.cat([e.tensor.to_tensor() for e in evs
                      if isinstance(e, events.NamedTensor) and e.name == name])


def rollouts(deployment, predictor, steps_list: list[int], repeat: int) -> list[str]:
    pose = torch.tensor([[0.4, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]])
    context_frame = frame(0)
    encoded = run(deployment, {"mode": "encode", "frames": context_frame})
    context = tensor_of(encoded, "latents")[-1]  # layer-normed, as the authors' `encode`
    encode_s = best_of(repeat, lambda: run(deployment, {"mode": "encode",
                                                        "frames": context_frame}))
    rows = [f"{'steps':>5} {'mstar ms':>10} {'recompute ms':>13} {'ratio':>7} {'max diff':>10}",
            f"(mstar's time includes encoding the context frame: {1000 * encode_s:.1f} ms)"]
    for steps in steps_list:
        actions = torch.from_numpy(np.random.default_rng(steps).uniform(
            -0.05, 0.05, (steps, 7)).astype(np.float32))
        request = {"mode": "rollout", "frames": context_frame, "actions": actions,
                   "states": pose, "rollout_steps": steps}
        # the same computation both ways: the same latents (float32 rounding apart)
        served = tensor_of(run(deployment, request), "rollout").view(steps, *context.shape)
        gap = (served - recompute_rollout(predictor, context, pose, actions)).abs().max()
        if gap > 1e-3:
            raise RuntimeError(f"the rollouts differ by {gap:.2e} at {steps} steps")
        cached = best_of(repeat, partial(run, deployment, request))
        recomputed = best_of(repeat, partial(recompute_rollout, predictor, context, pose,
                                             actions))
        rows.append(f"{steps:>5} {1000 * cached:>10.1f} {1000 * recomputed:>13.1f} "
                    f"{recomputed / cached:>6.2f}x {gap:>10.1e}")
    return rows


def planners(deployment, samples: int, iterations: int, counts: list[int],
             repeat: int) -> list[str]:
    def plan(i: int) -> None:
        run(deployment, {"mode": "plan", "frames": frame(100 + i), "goal": frame(200 + i),
                         "states": torch.zeros(1, 7), "samples": samples,
                         "iterations": iterations, "seed": i})

    rows = [f"samples {samples}, iterations {iterations}, horizon 2 (the authors' default)",
            f"{'planners':>8} {'wall s':>8} {'plans/s':>8} {'s per plan':>11}"]
    def together(pool: ThreadPoolExecutor, count: int) -> None:
        list(pool.map(plan, range(count)))

    for count in counts:
        with ThreadPoolExecutor(count) as pool:
            wall = best_of(repeat, partial(together, pool, count))
        rows.append(f"{count:>8} {wall:>8.2f} {count / wall:>8.2f} {wall / count:>11.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny preset, one run each")
    args = parser.parse_args()
    preset = "tiny" if args.quick else args.preset
    repeat = 1 if args.quick else args.repeat
    steps_list = [1, 4] if args.quick else [1, 4, 16]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(Path(tmp), preset, kind="ac")
        # 16 steps of the small preset's 66-token frames pass the CPU layout's 1024 tokens;
        # no encoder cache: every request encodes its context frame
        deployment = mstar.load("vjepa2_ac", CONFIG, preset=preset, model_path=str(directory),
                                max_seq_len=4096, encoder_cache_bytes=0)
        try:
            predictor = authors_ac_predictor_from(ACPredictorConfig(**PRESETS[preset]),
                                          directory / AC_FILE)
            print(f"# V-JEPA 2-AC `{preset}` preset, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads\n")
            print("\n".join(rollouts(deployment, predictor, steps_list, repeat)))
            print()
            print("\n".join(planners(deployment, args.samples, args.iterations, [1, 8],
                                     repeat)))
        finally:
            deployment.close()


if __name__ == "__main__":
    main()
