"""Our served Pi0.5 against lerobot 0.6.1's `PI05Policy`, through reference outputs committed
in `fixtures/` with the script that made them (`fixtures/make_fixtures.py`: lerobot's own
policy, processor pipelines and Euler loop in float32 on a tiny seeded checkpoint saved in
lerobot's layout, which is committed too).

Our side serves `fixtures/checkpoint` through the real loader and runtime (`mstar.load` in
process) and sends each fixture request (camera images, prompt, state, the same initial
noise); forward hooks on the real `vit_encoder`, the LLM's attention layers and `combine`
observe what the runtime hands them, so a mismatch says where it starts: the image
features (resize with padding, SigLIP, projector), the prefix's cached keys and values per
layer (embeddings, prompt, the PaliGemma stack), the first Euler step's velocity (the
action expert: time condition, adaRMS, joint attention), the last step's output (the flow
loop), the actions (unnormalising, slicing). Also: the prompt string and token ids, both
fixture requests at once, a `num_steps` override, and the checkpoint layout without
`embed_tokens`.

Tolerance: float32 on both sides, attention and reductions ordered differently (lerobot pads
the prompt to 200 tokens and masks, we do not pad): every compared tensor within
`ATOL` = 1e-5 absolute. The values are O(1) (the largest action about 5); on the CPU the
differences are below 1e-6 for features, velocities and actions and below 3e-6 for the
cached keys and values; 1e-4 would let through e.g. token embeddings without
Gemma's sqrt(width) scale in the first layer's keys (1.04e-4 off there, the RMSNorm hides
most of it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mstar
from mstar.events import NamedTensor
from mstar_pi05.config import PRESETS, from_lerobot, sizes_entry
from mstar_pi05.processing import Normalizer, prompt_text
from mstar_pi05.tokenizer import PACKAGED_TOKENIZER, load_tokenizer

torch.set_num_threads(1)  # tests/conftest.py does not reach plugin test folders

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint"
META = json.loads((FIXTURES / "inputs.json").read_text())
INPUTS = load_file(str(FIXTURES / "inputs.safetensors"))
EXPECTED = load_file(str(FIXTURES / "expected.safetensors"))
REQUESTS = range(len(META["requests"]))
ATOL = 1e-5


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max |ours - lerobot's| = {err:.3g} > {ATOL}"


def request(i: int, *, png: bool = False) -> dict[str, Any]:
    """Fixture request `i` as a `/generate` body: the camera images (camera -> uint8 array
    [H, W, 3]; with `png`, a list in the checkpoint's camera order of PNG data URLs), the
    raw prompt and state, lerobot's initial noise."""
    meta = META["requests"][i]
    arrays = [INPUTS[f"{i}.image.{cam}"].numpy() for cam in meta["cameras"]]
    images = [png_url(a) for a in arrays] if png else dict(zip(meta["cameras"], arrays,
                                                                strict=True))
    return {"images": images, "prompt": meta["prompt"],
            "state": INPUTS[f"{i}.state"].tolist(), "noise": INPUTS[f"{i}.noise"]}


def png_url(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def actions_of(events: list[Any]) -> torch.Tensor:
    found = [e.tensor.to_tensor() for e in events
             if isinstance(e, NamedTensor) and e.name == "actions"]
    assert len(found) == 1, events[-1]
    return found[0]


class Observed:
    """What the runtime hands `vit_encoder` (camera pixels -> image features), the LLM's
    attention layers in the first forward (the prefill: the prefix's keys and values after
    RoPE, as cached) and `combine` (each Euler step's x_t, t and velocity), per request
    item. Observe one request at a time."""

    def __init__(self, dep: Any):
        self.features: list[torch.Tensor] = []
        self.prefix_kv: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []
        engines = dep.workers[0].engines
        self.handles = [
            *(attention.register_forward_hook(
                lambda m, args, out, layer=layer: self._first_kv(layer, args))
              for layer, attention in enumerate(engines["LLM"].module.attention)),
            engines["vit_encoder"].module.register_forward_hook(
                lambda m, args, out: self.features.extend(
                    o["image_features"].clone() for o in out)),
            engines["combine"].module.register_forward_hook(
                lambda m, args, out: self.steps.extend(
                    {**{k: v.clone() for k, v in item.items() if torch.is_tensor(v)},
                     "x_next": o["x_t"].clone()} for item, o in zip(args[0], out, strict=True))),
        ]

    def _first_kv(self, layer: int, qkv: tuple[torch.Tensor, ...]) -> None:
        for name, x in zip("kv", qkv[1:3], strict=True):
            self.prefix_kv.setdefault(f"prefix_{name}{layer}", x.clone())

    def __enter__(self) -> Observed:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def served() -> Any:
    # no encoder cache: every request's images go through `vit_encoder`, in any test order
    with mstar.load("pi05", model_path=str(CHECKPOINT), encoder_cache_bytes=0) as dep:
        yield dep


def test_fixture_checkpoint_is_the_tiny_preset() -> None:
    """The committed checkpoint reads as the `tiny` preset's sizes, with lerobot's
    processor files, and ships the packaged tiny tokenizer (else: regenerate the fixtures)."""
    config_json = json.loads((CHECKPOINT / "config.json").read_text())
    config = from_lerobot(config_json)
    for name, value in PRESETS["tiny"].items():
        assert getattr(config, name) == value, name
    assert config_json["mstar_sizes"] == sizes_entry(config)
    assert (config.action_horizon, config.state_dim, config.action_dim) == (10, 8, 8)
    assert config.cameras == ("base_0_rgb", "left_wrist_0_rgb")
    files = sorted(str(p.relative_to(CHECKPOINT)) for p in CHECKPOINT.rglob("*") if p.is_file())
    assert files == META["checkpoint_files"]
    packaged = hashlib.sha256(PACKAGED_TOKENIZER.read_bytes()).hexdigest()
    assert packaged == META["tokenizer_sha256"], (
        "the packaged tiny tokenizer changed: regenerate the fixtures (fixtures/make_fixtures.py)")


@pytest.mark.parametrize("i", REQUESTS)
def test_prompt_and_tokens_match_lerobot(i: int) -> None:
    """The state normalised with the checkpoint's statistics, binned and written into the
    prompt as lerobot's `Pi05PrepareStateTokenizerProcessorStep` does (incl. states outside
    [q01, q99]: bins -1 and 255), and tokenized as lerobot's `TokenizerProcessorStep` does
    (BOS first, no padding)."""
    meta = META["requests"][i]
    state = Normalizer.from_directory(CHECKPOINT).state.normalize(INPUTS[f"{i}.state"])
    text = prompt_text(meta["prompt"], state)
    assert text == meta["lerobot_prompt"]
    assert load_tokenizer(CHECKPOINT).encode(text) == INPUTS[f"{i}.input_ids"].tolist()


@pytest.mark.parametrize("i", REQUESTS)
def test_actions_match_lerobot(served: Any, i: int) -> None:
    """Image features, the prefix's cached keys and values in every layer, the first Euler
    step's velocity, the last step's output and the actions all match lerobot's for the
    same checkpoint, inputs and noise."""
    with Observed(served) as seen:
        actions = actions_of(list(served.generate(request(i))))
    want_features = EXPECTED[f"{i}.image_features"]
    assert len(seen.features) == 1
    assert_close(seen.features[0], want_features, f"request {i} image features")
    prefix = {k.split(".", 1)[1]: v for k, v in EXPECTED.items() if k.startswith(f"{i}.prefix_")}
    assert prefix and sorted(seen.prefix_kv) == sorted(prefix)
    for name, want in prefix.items():
        assert_close(seen.prefix_kv[name], want, f"request {i} {name}")
    steps = seen.steps
    assert len(steps) == META["num_inference_steps"]
    assert torch.equal(steps[0]["x_t"], INPUTS[f"{i}.noise"]), "the first x_t is not the noise"
    assert float(steps[0]["t"]) == 1.0
    assert_close(steps[0]["velocity"], EXPECTED[f"{i}.velocity0"], f"request {i} velocity 0")
    assert_close(steps[-1]["x_next"], EXPECTED[f"{i}.x"], f"request {i} final x (normalised)")
    assert_close(actions, EXPECTED[f"{i}.actions"], f"request {i} actions")


def run_concurrently(dep: Any) -> dict[int, torch.Tensor]:
    """The actions of every fixture request, all in flight together (images as PNGs)."""
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = actions_of(list(dep.generate(request(i, png=True))))

    threads = [threading.Thread(target=run, args=(i,)) for i in REQUESTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(REQUESTS), "a request did not finish"
    return results


def test_concurrent_requests_match_lerobot(served: Any) -> None:
    """Both fixture requests in flight together (other prompt lengths and cameras in one
    ragged batch; the images sent as PNG data URLs) still give lerobot's actions."""
    for i, actions in run_concurrently(served).items():
        assert_close(actions, EXPECTED[f"{i}.actions"], f"request {i} actions")


@pytest.mark.parametrize("i", REQUESTS)
def test_num_steps_override_matches_lerobot(served: Any, i: int) -> None:
    """A request's `num_steps` (5, the checkpoint's is 10) gives lerobot's actions for
    `predict_action_chunk(num_steps=5)`: the Euler step and times follow it."""
    steps = META["few_steps"]
    actions = actions_of(list(served.generate({**request(i), "num_steps": steps})))
    assert_close(actions, EXPECTED[f"{i}.actions_{steps}_steps"], f"request {i} actions")


def test_checkpoint_without_embed_tokens_matches_lerobot(tmp_path: Path) -> None:
    """lerobot/pi05_base's layout (converted from openpi): no `embed_tokens`, PaliGemma's
    tied `lm_head` is the token embedding (lerobot's loader copies it there). The fixture
    checkpoint's two differ, so this also tells which one a checkpoint with both uses."""
    ckpt = shutil.copytree(CHECKPOINT, tmp_path / "checkpoint")
    weights = load_file(str(CHECKPOINT / "model.safetensors"))
    del weights[META["head_only_drops"]]
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with mstar.load("pi05", model_path=str(ckpt)) as dep:
        for i, actions in run_concurrently(dep).items():
            assert_close(actions, EXPECTED[f"{i}.actions_head_only"], f"request {i} actions")

