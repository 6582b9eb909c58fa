"""Pi0.5 end to end in process (`mstar.load`): a tiny seeded checkpoint in lerobot's layout
(`mstar_pi05.checkpoint`) through the real loader, normaliser and tokenizer; actions of the
robot's shape, seeded and given noise, ragged batches exact, camera subsets, the flow-step
override, a fixed action horizon, the encoder cache, and every bad input a 400 naming its
field while the runtime keeps serving."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mstar
from mstar import events
from mstar.engine import rng
from mstar.errors import RequestError
from mstar_pi05.checkpoint import write_checkpoint
from mstar_pi05.config import PRESETS, Pi05Config
from mstar_pi05.processing import Normalizer

STATE_DIM, ACTION_DIM = 8, 7
CONFIG = dataclasses.replace(Pi05Config(**PRESETS["tiny"]), state_dim=STATE_DIM,
                             action_dim=ACTION_DIM)
H, MAX_ACTION = CONFIG.action_horizon, CONFIG.max_action_dim


def picture(seed: int, h: int = 48, w: int = 64) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def request(**fields) -> dict:
    base = {"images": {"base_0_rgb": picture(0), "left_wrist_0_rgb": picture(1)},
            "prompt": "pick up the red block", "state": [0.1 * i - 0.3 for i in range(8)],
            "seed": 7}
    return base | fields


def actions(deployment, req: dict) -> torch.Tensor:
    evs = list(deployment.generate(req))
    assert isinstance(evs[-1], events.Finished), evs[-1]
    found = [e.tensor.to_tensor() for e in evs if isinstance(e, events.NamedTensor)
             and e.name == "actions"]
    assert len(found) == 1, evs
    return found[0]


def concurrently(deployment, reqs: list[dict]) -> list[torch.Tensor]:
    """The requests from parallel client threads, released together; results in order."""
    results: list[torch.Tensor | None] = [None] * len(reqs)
    start = threading.Barrier(len(reqs))

    def one(i: int) -> None:
        start.wait()
        results[i] = actions(deployment, reqs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a request did not finish"
    return results  # type: ignore[return-value]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pi05-tiny"), CONFIG, seed=0)


@pytest.fixture(scope="module")
def dep(checkpoint: Path):
    with mstar.load("pi05", "pi05_tiny", model_path=str(checkpoint)) as d:
        yield d


def test_checkpoint_gives_actions_of_the_robots_shape(dep):
    a = actions(dep, request())
    assert a.shape == (H, ACTION_DIM) and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all()) and float(a.std()) > 0.1


def test_seeds_and_given_noise(dep):
    a = actions(dep, request(seed=11))
    assert torch.equal(actions(dep, request(seed=11)), a)
    assert not torch.allclose(actions(dep, request(seed=12)), a, atol=1e-3)
    # the core RNG's draw for the seed (site "noise", the first step), given as noise
    drawn = rng.randn((H, MAX_ACTION), seed=11, child=0, site="noise", step=0)
    assert torch.equal(actions(dep, request(seed=99, noise=drawn)), a)
    other = torch.randn(H, MAX_ACTION, generator=torch.Generator().manual_seed(3))
    given = actions(dep, request(noise=other))
    assert torch.equal(actions(dep, request(seed=5, noise=other.tolist())), given)
    assert not torch.allclose(given, a, atol=1e-3)


def test_actions_are_unnormalised_with_the_checkpoints_statistics(dep, checkpoint, tmp_path):
    """The same weights without processor files answer the model's raw x_t (sliced); with
    them, lerobot's quantile inverse of it. Normalising the state changes the prompt, so
    the state is one whose bins the two agree on: all values at a quantile midpoint there
    are 0 raw and the midpoint's bin (128) normalised, so a raw state of bin 128 (0.0)."""
    bare = Path(shutil.copytree(checkpoint, tmp_path / "bare"))
    for f in bare.glob("policy_*"):
        f.unlink()
    stats = Normalizer.from_directory(checkpoint)
    mid = (stats.state.lo + stats.state.hi) / 2
    with mstar.load("pi05", "pi05_tiny", model_path=str(bare)) as raw_dep:
        raw = actions(raw_dep, request(state=[0.0] * STATE_DIM))
    normalised = actions(dep, request(state=mid.tolist()))
    lo, hi = stats.action.lo, stats.action.hi
    assert stats.action.mode == "QUANTILES"
    torch.testing.assert_close(normalised, (raw + 1) * (hi - lo) / 2 + lo)


def test_the_embedding_comes_from_embed_tokens_else_the_tied_head(checkpoint, tmp_path):
    """A file with both keys (lerobot 0.6.1 saves them untied) embeds with `embed_tokens`,
    as lerobot does; one with the head only (openpi's conversion) embeds with the head."""
    head = "paligemma_with_expert.paligemma.lm_head.weight"
    embed = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    weights = load_file(str(checkpoint / "model.safetensors"))
    other = torch.randn(weights[head].shape, generator=torch.Generator().manual_seed(1))
    answers = []
    for name, tensors in (("both", {**weights, head: other, embed: weights[head]}),
                          ("head", weights)):
        copy = Path(shutil.copytree(checkpoint, tmp_path / name))
        save_file(tensors, str(copy / "model.safetensors"))
        with mstar.load("pi05", "pi05_tiny", model_path=str(copy)) as d:
            answers.append(actions(d, request()))
    assert torch.equal(answers[0], answers[1])


def test_ragged_batch_is_exact(dep):
    """Requests of different prompt lengths, camera sets and flow steps (so flow times
    differ within a step) batched together give what
    each gives alone, up to float32 rounding (a batch's matrix products add in another
    order): nothing is padded, no row sees another request's rows."""
    reqs = [request(seed=1),
            request(images={"right_wrist_0_rgb": picture(5, 30, 90)}, seed=2, num_steps=4,
                    prompt="open the top drawer of the cabinet slowly, then close it again"),
            request(images=[picture(6), picture(7), picture(8)], seed=3, state=[0.5] * 3)]
    alone = [actions(dep, r) for r in reqs]
    before = len(dep.step_log("LLM"))
    together = concurrently(dep, reqs)
    widest = max(sum(e["walk"] == "denoise" for e in s.entries)
                 for s in dep.step_log("LLM")[before:])
    assert widest >= 2, "the requests never denoised in one step"
    for got, want in zip(together, alone, strict=True):  # float32 rounding of other GEMMs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_camera_subsets_steps_and_action_width(dep):
    full = actions(dep, request())
    one_camera = actions(dep, request(images={"left_wrist_0_rgb": picture(1)}))
    assert one_camera.shape == full.shape and not torch.allclose(one_camera, full, atol=1e-3)
    as_list = actions(dep, request(images=[picture(0), picture(1)]))  # camera order
    assert torch.equal(as_list, full)
    arrays = {"base_0_rgb": np.asarray(picture(0)), "left_wrist_0_rgb": np.asarray(picture(1))}
    assert torch.equal(actions(dep, request(images=arrays)), full)
    fewer_steps = actions(dep, request(num_steps=3))
    assert not torch.allclose(fewer_steps, full, atol=1e-3)
    assert torch.equal(actions(dep, request(num_steps=10)), full)  # the default
    narrow = actions(dep, request(action_dim=3))
    assert torch.equal(narrow, full[:, :3])


def test_repeated_frames_hit_the_encoder_cache_only_when_identical(dep):
    req = request(images={"base_0_rgb": picture(40)})
    hits = dep.counters()["vit_encoder.encoder_cache_hits"]
    first = actions(dep, req)
    assert dep.counters()["vit_encoder.encoder_cache_hits"] == hits
    assert torch.equal(actions(dep, req), first)
    assert dep.counters()["vit_encoder.encoder_cache_hits"] == hits + 1
    actions(dep, request(images={"base_0_rgb": picture(41)}))
    assert dep.counters()["vit_encoder.encoder_cache_hits"] == hits + 1


def test_a_fixed_action_horizon(checkpoint):
    """`model_kwargs: {action_horizon: 15}` (pi05_droid's) shortens the chunk."""
    with mstar.load("pi05", "pi05_tiny", model_path=str(checkpoint),
                    model_kwargs={"action_horizon": 15}) as d:
        a = actions(d, request())
        assert a.shape == (15, ACTION_DIM)
        with pytest.raises(RequestError) as info:
            d.generate(request(noise=torch.zeros(H, MAX_ACTION)))
        assert info.value.param == "noise" and "[15, 32]" in str(info.value)


def test_dummy_tiny_preset_gives_actions_that_see_the_observation():
    """`--load-format dummy --preset tiny` answers chunks that depend on the prompt and
    the cameras (`Pi05.adjust_dummy_weight`), not just the noise."""
    with mstar.load("pi05", "pi05_tiny", preset="tiny", load_format="dummy") as d:
        a = actions(d, request(state=[0.0] * 32))
        other_prompt = actions(d, request(state=[0.0] * 32, prompt="open the drawer"))
        other_image = actions(d, request(state=[0.0] * 32, images=[picture(9)]))
    assert a.shape == (Pi05Config(**PRESETS["tiny"]).action_horizon, 32)
    assert bool(torch.isfinite(a).all())
    assert float((a - other_prompt).abs().mean()) > 1e-3
    assert float((a - other_image).abs().mean()) > 1e-3


BAD = [
    ({"images": {"top_camera": picture(0)}}, "images", "unknown camera 'top_camera'"),
    ({"images": [picture(0)] * 4}, "images", "4 images but the checkpoint has 3 cameras"),
    ({"images": {}}, "images", "at least one camera image"),
    ({"images": None}, "images", "at least one camera image"),
    ({"images": {"base_0_rgb": "not an image"}}, "images", "images"),
    ({"images": {"base_0_rgb": 3}}, "images", "images"),
    ({"state": [0.0] * 9}, "state", "expected 1..8 values (the checkpoint's "
                                    "observation.state)"),
    ({"state": []}, "state", "expected 1..8 values"),
    ({"state": None}, "state", "required"),
    ({"state": [0.0, float("nan")]}, "state", "finite"),
    ({"state": [float("inf")]}, "state", "finite"),
    ({"prompt": None}, "prompt", "required"),
    ({"prompt": "   "}, "prompt", "required"),
    ({"prompt": "pick up " * 200}, "prompt", "tokenizer_max_length 200"),
    ({"num_steps": 0}, "num_steps", "num_steps"),
    ({"num_steps": 100000}, "num_steps", "num_steps"),
    ({"noise": torch.zeros(H, 7)}, "noise", "[50, 32]"),
    ({"noise": [[0.0] * 32] * 3}, "noise", "[50, 32]"),
    ({"action_dim": 8}, "action_dim", "at most 7"),
    ({"action_dim": 0}, "action_dim", "action_dim"),
]


@pytest.mark.parametrize(("fields", "param", "words"), BAD,
                         ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(dep, fields, param, words):
    with pytest.raises(RequestError) as info:
        dep.generate(request(**fields))
    assert info.value.code == 400 and info.value.param == param, str(info.value)
    assert words in str(info.value), str(info.value)


def test_the_runtime_keeps_serving_after_bad_input(dep):
    want = actions(dep, request(seed=21))
    for fields, _, _ in BAD:
        with pytest.raises(RequestError):
            dep.generate(request(**fields))
    assert torch.equal(actions(dep, request(seed=21)), want)
    assert dep.frontend.live_requests() == 0


@pytest.mark.parametrize(("mode", "lo", "hi"), [("QUANTILES", "q01", "q99"),
                                                ("QUANTILE10", "q10", "q90"),
                                                ("MIN_MAX", "min", "max")])
def test_normaliser_modes_map_their_bounds_to_plus_minus_one(checkpoint, tmp_path, mode, lo,
                                                             hi):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        text = (copy / name).read_text().replace('"QUANTILES"', f'"{mode}"')
        (copy / name).write_text(text)
    norm = Normalizer.from_directory(copy)
    stats = load_file(str(copy / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    bounds = torch.stack([stats[f"observation.state.{lo}"], stats[f"observation.state.{hi}"]])
    torch.testing.assert_close(norm.state.normalize(bounds),
                               torch.tensor([[-1.0], [1.0]]).expand(2, STATE_DIM))
    x = torch.randn(H, ACTION_DIM)
    torch.testing.assert_close(norm.action.normalize(norm.action.unnormalize(x)), x)


def test_mean_std_identity_and_refused_relative_actions(checkpoint, tmp_path):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    pre = copy / "policy_preprocessor.json"
    pre.write_text(pre.read_text().replace('"STATE": "QUANTILES"', '"STATE": "MEAN_STD"'))
    stats = load_file(str(copy / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    mean, std = stats["observation.state.mean"], stats["observation.state.std"]
    norm = Normalizer.from_directory(copy)
    torch.testing.assert_close(norm.state.normalize(mean + std), std / (std + 1e-8))
    assert Normalizer.from_directory(None).action.unnormalize(mean) is mean
    pre.write_text(pre.read_text().replace('"enabled": false', '"enabled": true', 1))
    with pytest.raises(ValueError, match="use_relative_actions"):
        Normalizer.from_directory(copy)
