"""The whole pipeline through the runtime equals a plain-torch reference of the same
weights run request by request (dense attention, explicit masks, no engine code): text
after an image, the streamed consumer output, denoising with CFG, and a rollout."""

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


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


@pytest.fixture(scope="module")
def runs(tiny_ckpt):
    """All three requests at once (batched together), plus their plans."""
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256) as d:
        plans = [d.model.process_prompt(r) for r in (TEXT, ACT, ROLL)]
        results = run_concurrently(d, [TEXT, ACT, ROLL])
        settle(d)
    return plans, results


def test_text_and_streamed_consumer(ref, runs):
    plans, (text, _, _) = runs
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
    plans, (_, act, _) = runs
    noise = rng.randn((4, 4), seed=ACT["seed"], child=0, site="noise", step=0)
    expected = ref.act(plans[1].params["prompt_ids"], torch.tensor(ACT["image"]),
                       ACT["num_steps"], ACT["guidance_scale"], noise)
    torch.testing.assert_close(tensors(act, "actions")[0], expected, atol=1e-4, rtol=1e-4)


def test_rollout(ref, runs):
    plans, (_, _, roll) = runs
    expected = ref.rollout(plans[2].params["prompt_ids"], torch.tensor(ROLL["frame"]),
                           ROLL["num_frames"])
    torch.testing.assert_close(torch.stack(tensors(roll, "frame")), expected, atol=1e-4,
                               rtol=1e-4)
