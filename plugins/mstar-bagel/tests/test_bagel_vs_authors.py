"""Our served BAGEL against the authors' modelling code (ByteDance-Seed/Bagel), through
reference outputs committed in `fixtures/` with the script that made them
(`fixtures/make_bagel_fixtures.py`: the authors' `Bagel`, `Qwen2ForCausalLM` MoT, navit
SigLIP and FLUX `AutoEncoder` run in float32 on the same tiny checkpoint, inputs and noise).

The checkpoint is regenerated here (preset tiny, seed 0) and its tensors' digest checked
against the one the fixtures were made with. Our side runs through `mstar.load` in process;
forward hooks on the real `combine_cfg` and `vae_decoder` modules observe what the runtime
hands them: each guidance context's velocity over the whole image chunk, the latent before
decoding.

Tasks (`fixtures.TASKS`): text-to-image (text guidance, global renorm), an edit (text and
image guidance, text_channel renorm), the edit with a `cfg_interval` that leaves the last
step unguided, and text-to-image with the authors' demo settings (app.py leaves
cfg_img_scale at the inferencer's 1.5, so the image-free context, for a text-only prompt the
same texts, guides too); understanding (greedy tokens).

Tolerances (float32 on both sides, attention and reductions ordered differently):
velocities and latents within 1e-4 relative to the tensor's largest magnitude, images within
±2 uint8 levels, greedy tokens equal.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mstar
from mstar.engine import rng
from mstar.events import Image as ImageEvent
from mstar.events import TextDelta
from mstar_bagel.checkpoint import write_tiny_checkpoint
from mstar_bagel.flow import guided_velocity

torch.set_num_threads(1)  # tests/conftest.py does not reach plugin test folders

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_bagel_fixtures",
                                               FIXTURES / "make_bagel_fixtures.py")
assert _spec is not None and _spec.loader is not None
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

REL = 1e-4
PIXEL_LEVELS = 2


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= REL * scale, f"{what}: max |ours - authors'| = {err:.3g} > {REL} × {scale:.3g}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("bagel") / "ckpt", "tiny", seed=0)
    meta = json.loads((FIXTURES / "bagel_inputs.json").read_text())
    assert fixtures.checkpoint_digest(ckpt) == meta["checkpoint_sha256"], (
        "the tiny checkpoint writer changed: regenerate the fixtures "
        "(fixtures/make_bagel_fixtures.py, both steps)")
    return ckpt


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Any:
    with mstar.load("bagel", model_path=str(checkpoint)) as dep:
        yield dep


class Observed:
    """What the runtime hands `combine_cfg` (per denoising step) and `vae_decoder`."""

    def __init__(self, dep: Any):
        self.steps: list[dict[str, Any]] = []
        self.final: list[torch.Tensor] = []
        worker = dep.workers[0]
        self.handles = [
            worker.engines["combine_cfg"].module.register_forward_hook(
                lambda m, args, out: self.steps.append(dict(args[0][0]))),
            worker.engines["vae_decoder"].module.register_forward_hook(
                lambda m, args, out: self.final.append(args[0][0]["x_t"].clone())),
        ]

    def __enter__(self) -> Observed:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _image(dep: Any, request: dict[str, Any]) -> np.ndarray:
    events = list(dep.generate(request))
    images = [e for e in events if isinstance(e, ImageEvent)]
    assert len(images) == 1, events
    return np.asarray(Image.open(io.BytesIO(images[0].data)).convert("RGB"))


@pytest.mark.parametrize("task", list(fixtures.TASKS))
def test_image_generation_matches_authors(served: Any, task: str) -> None:
    """(a) the MoT routing of the first step's chunk (markers by the understanding expert,
    latents by the generation expert, over the cached prefix) in each guidance context,
    (b) that step's mixed velocity, (c)/(d) the whole run's final latent and image; per
    step, the contexts that ran (`edit_interval`: none but the full one outside
    `cfg_interval`)."""
    spec = fixtures.TASKS[task]
    ref = load_file(str(FIXTURES / "bagel_reference.safetensors"))
    contexts = json.loads((FIXTURES / "bagel_reference.json").read_text())["contexts"][task]
    request = {**spec.knobs, "mode": "image", "seed": fixtures.SEED}
    if spec.edit:  # the output takes the input's size
        request["image"] = fixtures.synthetic_image(*spec.size)
    else:
        request["width"], request["height"] = spec.size
    with Observed(served) as seen:
        image = _image(served, request)
    assert len(seen.final) == 1
    names = ["velocity", "velocity_cfg_text", "velocity_cfg_img"]
    ran = [[name for name in names if step.get(name) is not None] for step in seen.steps]
    # Without an input image the image-free context is the full one: the authors run it, we
    # reuse the full context's velocity (`cfg_img_is_full`), so we run one context less.
    reused = not spec.edit
    want = [n - 1 if reused and n == 3 else n for n in contexts]
    assert [len(r) for r in ran] == want, f"contexts run per step: {ran}"

    first = seen.steps[0]
    noise = rng.randn(first["x_t"].shape, seed=fixtures.SEED, child=0, site="noise", step=0)
    assert torch.equal(first["x_t"], noise), "latent_init's noise is not the reference's key"
    if spec.step0:
        authors_ran = names[:contexts[0]]
        for b, name in enumerate(authors_ran):
            ours = first["velocity"] if reused and name == "velocity_cfg_img" else first[name]
            assert_close(ours, ref[f"{task}.step0.chunk_velocity{b}"],
                         f"{task} step 0 {name} (whole chunk)")
        rows = {name: first[name][1:-1] if first.get(name) is not None else None
                for name in names}
        if reused and "velocity_cfg_img" in authors_ran:
            rows["velocity_cfg_img"] = rows["velocity"]
        knobs = spec.knobs
        mixed = guided_velocity(rows["velocity"], rows["velocity_cfg_text"],
                                rows["velocity_cfg_img"], text_scale=knobs["cfg_text_scale"],
                                img_scale=knobs["cfg_img_scale"],
                                renorm_type=knobs["cfg_renorm_type"],
                                renorm_min=knobs["cfg_renorm_min"])
        assert_close(mixed, ref[f"{task}.step0.mixed"], f"{task} step 0 mixed velocity")
    assert_close(seen.final[0], ref[f"{task}.latent"], f"{task} final latent")
    expected = ref[f"{task}.image"].numpy()
    assert image.shape == expected.shape == (spec.size[1], spec.size[0], 3)
    diff = np.abs(image.astype(int) - expected.astype(int)).max()
    assert diff <= PIXEL_LEVELS, f"{task} image: max pixel difference {diff}"


def test_understanding_matches_authors(served: Any) -> None:
    """(e) greedy tokens for the image (ViT) then the question, as the authors' inferencer
    with `understanding_output=True`."""
    meta = json.loads((FIXTURES / "bagel_reference.json").read_text())
    request = {"prompt": fixtures.UND["prompt"], "mode": "text",
               "image": fixtures.synthetic_image(), "max_tokens": fixtures.UND["max_tokens"],
               "temperature": 0.0, "seed": fixtures.SEED}
    tokens = [t for e in served.generate(request) if isinstance(e, TextDelta)
              for t in e.token_ids]
    assert tokens[:len(meta["und_tokens"])] == meta["und_tokens"]


def test_cfg_parallel_edit_matches_authors(checkpoint: Path) -> None:
    """The edit with each guidance context on its own rank (`bagel_cfg_parallel`: the
    text-free context on rank 1, the image-free one on rank 2) gives the authors' latent and
    image too."""
    spec = fixtures.TASKS["edit"]
    ref = load_file(str(FIXTURES / "bagel_reference.safetensors"))
    request = {**spec.knobs, "mode": "image", "seed": fixtures.SEED,
               "image": fixtures.synthetic_image(*spec.size)}
    with mstar.load("bagel_cfg_parallel", model_path=str(checkpoint)) as dep:
        with Observed(dep) as seen:
            image = _image(dep, request)
        assert all(dep.step_log("LLM", rank=r) for r in (1, 2))
    assert_close(seen.final[0], ref["edit.latent"], "cfg-parallel edit final latent")
    diff = np.abs(image.astype(int) - ref["edit.image"].numpy().astype(int)).max()
    assert diff <= PIXEL_LEVELS, f"cfg-parallel edit image: max pixel difference {diff}"
