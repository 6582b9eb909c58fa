"""The whole pipeline through the runtime equals a plain-torch reference of the same
weights run request by request (dense attention, explicit masks, no engine code): text
after an image, the streamed consumer output, denoising with CFG (at every step, and only
inside a `cfg_interval`), and a rollout."""

from __future__ import annotations

import pytest
import torch
from conftest import audio, frame, image, run_concurrently, settle, tensors, tokens

import mstar
from mstar.engine import rng
from mstar_testvla.model import STREAM_POLICY
from mstar_testvla.tokenizer import EOS
from tests.plugins.testvla.reference import Reference

TEXT = {"prompt": "a cat <image> is", "image": image(11), "max_tokens": 10,
        "temperature": 0, "stream_consumer": True}
ACT = {"prompt": "<image>open the drawer", "image": image(12), "mode": "act",
       "num_steps": 5, "guidance_scale": 2.5, "seed": 77}
ROLL = {"prompt": "walk", "mode": "rollout", "num_frames": 4, "frame": frame(13)}
#: Flow times 1, .8, .6, .4, .2: CFG at the two middle-high steps only, so the branch is
#: skipped before it first runs and after it last ran.
INTERVAL = {**ACT, "cfg_interval": [0.5, 0.9], "seed": 78}


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


@pytest.fixture(scope="module")
def runs(tiny_ckpt):
    """All four requests at once (batched together), plus their plans."""
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256) as d:
        plans = [d.model.process_prompt(r) for r in (TEXT, ACT, ROLL, INTERVAL)]
        results = run_concurrently(d, [TEXT, ACT, ROLL, INTERVAL])
        settle(d)
    return plans, results


def test_text_and_streamed_consumer(ref, runs):
    plans, (text, _, _, _) = runs
    prompt = plans[0].params["prompt_ids"]
    img = torch.tensor(TEXT["image"])
    got = tokens(text)
    expected, _ = ref.generate_text(prompt, img, TEXT["max_tokens"])
    assert got == expected
    generated = got[:-1] if got[-1] == EOS else got
    mid = ref.run(prompt + got, image=img, text_from=len(prompt))["mid"]
    hidden = mid[len(prompt) - 1: len(prompt) - 1 + len(got)]
    wave = ref.consume(torch.tensor(got), hidden, STREAM_POLICY)
    assert len(generated) >= 1
    torch.testing.assert_close(audio(text), wave, atol=1e-4, rtol=1e-4)


def test_denoise_with_cfg(ref, runs):
    """The unconditional branch's actions sit right after its own shorter context (its own
    `prepare` positions, while the conditional branch's follow the whole prompt)."""
    plans, (_, act, _, _) = runs
    noise = rng.randn((4, 4), seed=ACT["seed"], child=0, site="noise", step=0)
    expected = ref.act(plans[1].params["prompt_ids"], torch.tensor(ACT["image"]),
                       ACT["num_steps"], ACT["guidance_scale"], noise)
    torch.testing.assert_close(tensors(act, "actions")[0], expected, atol=1e-4, rtol=1e-4)


def test_rollout(ref, runs):
    plans, (_, _, roll, _) = runs
    expected = ref.rollout(plans[2].params["prompt_ids"], torch.tensor(ROLL["frame"]),
                           ROLL["num_frames"])
    torch.testing.assert_close(torch.stack(tensors(roll, "frame")), expected, atol=1e-4,
                               rtol=1e-4)


def test_denoise_cfg_only_inside_interval(ref, runs):
    """Steps outside `cfg_interval` combine the conditional velocity alone: the skipped
    branch's velocity of an earlier step is gone from the environment."""
    plans, (_, _, _, act) = runs
    noise = rng.randn((4, 4), seed=INTERVAL["seed"], child=0, site="noise", step=0)
    args = (plans[3].params["prompt_ids"], torch.tensor(INTERVAL["image"]),
            INTERVAL["num_steps"], INTERVAL["guidance_scale"], noise)
    got = tensors(act, "actions")[0]
    torch.testing.assert_close(got, ref.act(*args, tuple(INTERVAL["cfg_interval"])),
                               atol=1e-4, rtol=1e-4)
    for everywhere_or_never in ((0.0, 1.0), (1.0, 1.0)):  # the interval made a difference
        assert not torch.allclose(got, ref.act(*args, everywhere_or_never), atol=1e-3)
