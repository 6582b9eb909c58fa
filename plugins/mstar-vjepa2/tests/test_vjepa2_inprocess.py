"""V-JEPA 2 and V-JEPA 2-AC end to end in process (`mstar.load`): tiny seeded checkpoints
in the real layouts (`mstar_vjepa2.checkpoint`: hub safetensors, the authors' pickled AC
file) through the real loader; latents and masked predictions equal to the modules run
directly, a rollout streamed step by step with its poses and equal to the authors'
recompute-everything loop, CEM plans deterministic per seed, dummy weights, every bad input
a 400 naming its field, and a client gone mid-request freeing its pages."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from authors_code import authors_ac_predictor_from

import mstar
from mstar import events
from mstar.engine import rng
from mstar.errors import RequestError
from mstar.plugins.manager import model_registry
from mstar.weights import WeightSpec, iter_checkpoint, load_weights
from mstar_vjepa2 import cem
from mstar_vjepa2.ac_predictor import ACPredictorConfig
from mstar_vjepa2.checkpoint import AC_FILE, write_checkpoint
from mstar_vjepa2.config import PRESETS, VJepa2Config
from mstar_vjepa2.encoder import WEIGHT_KEY_MAPS as ENCODER_KEYS
from mstar_vjepa2.encoder import VideoEncoder
from mstar_vjepa2.model import MAX_SAMPLES, VJepa2AC
from mstar_vjepa2.pose import compute_new_pose
from mstar_vjepa2.predictor import WEIGHT_KEY_MAPS as PREDICTOR_KEYS
from mstar_vjepa2.predictor import MaskedPredictor
from mstar_vjepa2.processing import preprocess_video

CFG = VJepa2Config(**PRESETS["tiny"])
AC = VJepa2AC.make_config(preset="tiny")
TOKENS = CFG.tokens_per_tubelet  # 16 patches a frame (tubelet) in the tiny preset
PLAN = {"mode": "plan", "samples": 12, "topk": 3, "iterations": 3, "seed": 5}


def clip(seed: int, frames: int = 4, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (frames, h, w, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def tensors(evs: list[events.Event], name: str) -> list[torch.Tensor]:
    return [e.tensor.to_tensor() for e in evs if isinstance(e, events.NamedTensor)
            and e.name == name]


def run(dep: mstar.runtime.local.LocalDeployment, req: dict) -> list[events.Event]:
    evs = list(dep.generate(req))
    assert isinstance(evs[-1], events.Finished), evs[-1]
    return evs


def bad(dep: mstar.runtime.local.LocalDeployment, req: dict) -> tuple[str | None, str]:
    """(param, message) of the request's 400: raised at submission (`process_prompt`)."""
    with pytest.raises(RequestError) as err:
        list(dep.generate(req))
    assert err.value.code == 400, err.value
    return err.value.param, str(err.value)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def settle(dep: mstar.runtime.local.LocalDeployment) -> None:
    """Every request released: pages and tensors back to zero."""
    wait_for(lambda: dep.pages_in_use() == 0 and dep.live_tensors() == 0
             and dep.frontend.live_requests() == 0)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("vjepa2-hf"), "tiny", kind="hf")


@pytest.fixture(scope="module")
def ac_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("vjepa2-ac"), "tiny", kind="ac")


@pytest.fixture(scope="module")
def vjepa2(hf_checkpoint: Path):
    with mstar.load("vjepa2", "vjepa2_tiny", model_path=str(hf_checkpoint)) as d:
        yield d


@pytest.fixture(scope="module")
def ac(ac_checkpoint: Path):
    with mstar.load("vjepa2_ac", "vjepa2_ac_tiny", preset="tiny",
                    model_path=str(ac_checkpoint)) as d:
        yield d


def loaded(module: torch.nn.Module, checkpoint: Path, key_map: tuple) -> torch.nn.Module:
    files = sorted(checkpoint.glob("*.safetensors"))
    load_weights(module, iter_checkpoint(files), WeightSpec(key_map=key_map))
    return module.eval()


@pytest.mark.parametrize("name", ["vjepa2", "vjepa2_ac"])
def test_the_plugin_registers_each_model_as_its_class_defines_it(name):
    spec = model_registry().get(name)
    cls = spec.load_class()
    assert set(spec.presets) == set(cls.presets)
    assert spec.default_config in spec.configs and f"{name}_tiny" in spec.configs


# -- vjepa2 ---------------------------------------------------------------------------------

def test_latents_are_the_encoders_over_the_preprocessed_clip(vjepa2, hf_checkpoint):
    frames = clip(0)
    encoder = loaded(VideoEncoder(CFG), hf_checkpoint, ENCODER_KEYS["video_encoder"])
    # uint8 [T, H, W, 3], and [T, 3, H, W] floats in [0, 1]
    for given in (frames, frames.permute(0, 3, 1, 2) / 255.0):
        got = tensors(run(vjepa2, {"frames": given}), "latents")
        assert len(got) == 1 and list(got[0].shape) == [2 * TOKENS, CFG.hidden_size]
        with torch.no_grad():
            want = encoder([{"pixel_values": preprocess_video(given, CFG)}])[0]["latents"]
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    # three frames: the third, short of a tubelet, is dropped as the hub model drops it
    odd = tensors(run(vjepa2, {"frames": frames[:3]}), "latents")[0]
    torch.testing.assert_close(odd, tensors(run(vjepa2, {"frames": frames[:2]}), "latents")[0])


def test_predict_target_frames_and_a_seeded_mask(vjepa2, hf_checkpoint):
    frames = clip(1)
    got = tensors(run(vjepa2, {"frames": frames, "mode": "predict", "target_frames": [1]}),
                  "predictions")
    assert len(got) == 1 and list(got[0].shape) == [TOKENS, CFG.hidden_size]
    encoder = loaded(VideoEncoder(CFG), hf_checkpoint, ENCODER_KEYS["video_encoder"])
    predictor = loaded(MaskedPredictor(CFG), hf_checkpoint, PREDICTOR_KEYS["predictor"])
    with torch.no_grad():
        latents = encoder([{"pixel_values": preprocess_video(frames, CFG)}])[0]["latents"]
        want = predictor([{"latents": latents, "context_ids": torch.arange(TOKENS),
                           "target_ids": torch.arange(TOKENS, 2 * TOKENS)}])[0]["predictions"]
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    masked = {"frames": frames, "mode": "predict", "mask_ratio": 0.25}
    a, b, c = (tensors(run(vjepa2, masked | {"seed": s}), "predictions")[0] for s in (3, 3, 4))
    assert list(a.shape) == [8, CFG.hidden_size]  # a quarter of 32 tokens
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


# -- vjepa2_ac ------------------------------------------------------------------------------

def authors_from(checkpoint: Path) -> torch.nn.Module:
    """The authors' AC predictor holding the checkpoint's predictor weights."""
    return authors_ac_predictor_from(AC.predictor, checkpoint / AC_FILE)


def rollout_request(steps: int, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"frames": clip(seed, frames=2), "mode": "rollout",
            "states": torch.rand(2, 7, generator=gen),
            "actions": 0.05 * torch.randn(1 + steps, 7, generator=gen)}


def test_rollout_streams_each_step_with_its_pose(ac):
    req = rollout_request(steps=3)
    evs = run(ac, req)
    named = [(e.name, e.index) for e in evs if isinstance(e, events.NamedTensor)]
    assert named == [("rollout", 0), ("poses", 0)] * 3  # a row of each per step
    assert all(list(t.shape) == [1, TOKENS, AC.predictor.embed_dim]
               for t in tensors(evs, "rollout"))
    pose, want = req["states"][-1:][None], []
    for k in range(3):
        pose = compute_new_pose(pose, req["actions"][1 + k][None, None])
        want.append(pose[0, 0])
    torch.testing.assert_close(torch.cat(tensors(evs, "poses")), torch.stack(want))


def test_rollout_with_the_persistent_cache_equals_the_authors_recompute(ac, ac_checkpoint):
    """The served rollout (each step appends one frame to the cache) against the authors'
    world-model loop on the same checkpoint: the whole trajectory through their predictor
    every step, each prediction layer-normed, poses integrated from the actions."""
    steps, req = 3, rollout_request(steps=3, seed=4)
    got = torch.cat(tensors(run(ac, req), "rollout"))
    context = tensors(run(ac, {"frames": req["frames"]}), "latents")[0]
    # the authors' WorldModel.encode layer-norms the encoder's latents (normalize_reps)
    torch.testing.assert_close(context, F.layer_norm(context, context.shape[-1:]), atol=1e-4,
                               rtol=0)
    authors = authors_from(ac_checkpoint)
    reps, poses, actions = context, req["states"], req["actions"]
    with torch.no_grad():
        for _h in range(steps):
            n = reps.shape[0]
            pred = authors(reps.flatten(0, 1)[None], actions[None, :n], poses[None])[0]
            reps = torch.cat([reps, F.layer_norm(pred[-TOKENS:], pred.shape[-1:])[None]])
            poses = torch.cat([poses, compute_new_pose(poses[-1:][None],
                                                       actions[n - 1][None, None])[0]])
    torch.testing.assert_close(got, reps[2:], atol=1e-4, rtol=0)


def test_plan_equals_the_authors_cem_over_their_predictor(ac, ac_checkpoint):
    """The served plan (candidates forked from the kept context, joined once per round)
    against the authors' CEM loop in plain torch over their predictor on the same
    checkpoint, every candidate's rollout recomputed from the context, with the runtime's
    keyed noise (seed, child c, site "cem" of round r)."""
    frames = clip(9, frames=3)
    req = PLAN | {"frames": frames[:2], "states": 0.1 * torch.rand(2, 7),
                  "actions": [[0.02, -0.01, 0.03, 0.0, 0.0, 0.0, 0.5]], "goal": frames[2]}
    evs = run(ac, req)
    context = tensors(run(ac, {"frames": frames[:2]}), "latents")[0]
    goal = tensors(run(ac, {"frames": frames[2:]}), "latents")[0][0]
    authors = authors_from(ac_checkpoint)
    s, h, topk = req["samples"], 2, req["topk"]
    mean, std = cem.initial_distribution(h, 0.05)
    best = []
    for r in range(req["iterations"]):
        noise = torch.stack([rng.randn((h, 4), seed=req["seed"], child=c,
                                       site=rng.noise_site("cem", (), r), step=0)
                             for c in range(s)])
        actions = cem.sample_actions(mean, std, noise, 0.05)
        finals = []
        for a in actions:
            reps, poses = context, req["states"]
            acts = torch.cat([torch.tensor(req["actions"]), a])
            with torch.no_grad():
                for _ in range(h):
                    n = reps.shape[0]
                    pred = authors(reps.flatten(0, 1)[None], acts[None, :n], poses[None])[0]
                    reps = torch.cat([reps, F.layer_norm(pred[-TOKENS:],
                                                         pred.shape[-1:])[None]])
                    poses = torch.cat([poses, compute_new_pose(
                        poses[-1:][None], acts[n - 1][None, None])[0]])
            finals.append(reps[-1])
        scores = cem.l1_scores(torch.stack(finals), goal)
        best.append(scores.min())
        mean, std = cem.refit(actions, scores, mean, std, topk)
    torch.testing.assert_close(tensors(evs, "actions")[0], cem.planned_actions(mean),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(tensors(evs, "plan_scores")), torch.stack(best),
                               atol=1e-4, rtol=0)


def test_the_authors_file_needs_no_config_json(ac, ac_checkpoint):
    """The authors' release is a bare state dict: without a preset the model takes its
    config's defaults (the released sizes), here overridden to the tiny ones by
    `model_kwargs`, and serves as the preset does."""
    assert not list(ac_checkpoint.glob("*.json"))
    req = rollout_request(steps=2, seed=11)
    with mstar.load("vjepa2_ac", "vjepa2_ac_tiny", model_path=str(ac_checkpoint),
                    model_kwargs={"encoder": AC.encoder, "predictor": AC.predictor}) as d:
        got = tensors(run(d, req), "rollout")
    torch.testing.assert_close(torch.stack(got), torch.stack(tensors(run(ac, req), "rollout")),
                               atol=0, rtol=0)


def test_ac_config_matches_the_authors_predictor_sizes():
    assert isinstance(AC.predictor, ACPredictorConfig)
    assert AC.predictor.embed_dim == AC.encoder.hidden_size
    assert AC.predictor.patches_per_frame == AC.encoder.tokens_per_tubelet


def test_plan_is_horizon_actions_deterministic_per_seed(ac):
    frames = clip(6, frames=2)
    req = PLAN | {"frames": frames[:1], "pose": [0.1] * 7, "goal": frames[1]}
    first = run(ac, req)
    (plan,) = tensors(first, "actions")
    assert list(plan.shape) == [2, 7]  # the authors' horizon
    assert torch.equal(plan[:, 3:6], torch.zeros(2, 3))  # no rotation, as the authors'
    assert len(tensors(first, "plan_scores")) == 3  # a row per round
    torch.testing.assert_close(tensors(run(ac, req), "actions")[0], plan, atol=0, rtol=0)
    assert not torch.equal(tensors(run(ac, req | {"seed": 6}), "actions")[0], plan)
    # two context frames: the first transition's action is given, the candidates fork it
    two = PLAN | {"frames": frames, "states": torch.rand(2, 7), "actions": [[0.01] * 7],
                  "goal": frames[0]}
    assert list(tensors(run(ac, two), "actions")[0].shape) == [2, 7]
    settle(ac)


@pytest.mark.parametrize("model,config", [("vjepa2", "vjepa2_tiny"),
                                          ("vjepa2_ac", "vjepa2_ac_tiny")])
def test_dummy_weights_serve_the_tiny_preset(model, config):
    frames = clip(7)
    with mstar.load(model, config, preset="tiny", load_format="dummy") as d:
        assert tensors(run(d, {"frames": frames}), "latents")
        if model == "vjepa2_ac":
            assert len(tensors(run(d, rollout_request(steps=2)), "rollout")) == 2
            plan = PLAN | {"frames": frames[:1], "pose": [0.0] * 7, "goal": frames[3]}
            assert list(tensors(run(d, plan), "actions")[0].shape) == [2, 7]


# -- bad input ------------------------------------------------------------------------------

def corrupt_video() -> str:
    return "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" +
                                                       b"not a video" * 20).decode()


@pytest.mark.parametrize("req,param,fragment", [
    ({"frames": clip(0, frames=1)}, "frames", "1 frames; the clip needs from tubelet_size=2"),
    ({"frames": clip(0, frames=5)}, "frames", "to frames_per_clip=4"),
    ({"frames": torch.zeros(4, 40, 48, 4, dtype=torch.uint8)}, "frames", "[T, H, W, 3]"),
    ({"frames": clip(0, h=4, w=6)}, "frames", "smaller than one 8-pixel patch"),
    ({"video": corrupt_video()}, "video", "video"),
    ({}, "video", "exactly one of"),
    ({"frames": clip(0), "mode": "predict", "target_frames": [0, 1]}, "target_frames",
     "not all"),
])
def test_bad_clips_are_400s_naming_the_field(vjepa2, req, param, fragment):
    got, message = bad(vjepa2, req)
    assert got == param and fragment in message, message
    assert tensors(run(vjepa2, {"frames": clip(0)}), "latents")  # still serving


def plan_req(**fields) -> dict:
    frames = clip(8, frames=2)
    return PLAN | {"frames": frames[:1], "pose": [0.0] * 7, "goal": frames[1]} | fields


@pytest.mark.parametrize("req,param,fragment", [
    (rollout_request(2) | {"actions": torch.zeros(3, 6)}, "actions", "[N, 7]"),
    (rollout_request(2) | {"actions": torch.zeros(3, 7), "rollout_steps": 5}, "actions",
     "needs 6"),
    (rollout_request(2) | {"states": torch.zeros(1, 7)}, "states", "expected 2 rows"),
    ({k: v for k, v in rollout_request(2).items() if k != "actions"}, "actions", "required"),
    (rollout_request(2) | {"rollout_steps": 40, "actions": torch.zeros(41, 7)},
     "rollout_steps", "predictor's 8 frames"),
    ({k: v for k, v in plan_req().items() if k != "goal"}, "goal", "required"),
    (plan_req(samples=10 ** 6), "samples", f"at most {MAX_SAMPLES}"),
    (plan_req(topk=13), "topk", "at most samples=12"),
    (plan_req(topk=1), "topk", "greater than or equal to 2"),
    (plan_req(iterations=10 ** 4), "iterations", "at most"),
])
def test_bad_ac_requests_are_400s_naming_the_field(ac, req, param, fragment):
    got, message = bad(ac, req)
    assert got == param and fragment in message, message


# -- a client gone mid-request ----------------------------------------------------------------

def test_client_gone_mid_rollout_and_mid_plan_frees_the_pages(ac):
    settle(ac)
    stream = ac.generate(rollout_request(steps=6))
    first = next(e for e in stream if isinstance(e, events.NamedTensor))
    assert first.name == "rollout" and first.index == 0
    stream.close()  # what the API server does when the client disconnects
    settle(ac)

    rounds = len(ac.step_log("cem_score"))
    stream = ac.generate(plan_req(iterations=100, samples=16, topk=2))
    next(e for e in stream if isinstance(e, events.NamedTensor) and e.name == "plan_scores")
    assert ac.pages_in_use() > 0  # the children's forks and the kept context
    stream.close()
    settle(ac)
    assert len(ac.step_log("cem_score")) - rounds < 100  # the join stopped
