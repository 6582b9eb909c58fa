"""BAGEL's scheduling end to end, in one process (tiny preset, dummy weights), read from the
LLM's step log: image requests batch across requests in the denoise loop over a prefix
prefilled once, a request's guidance branches share one forward, an image in flight does not
hold up a chat, and a repeated prompt comes from the prefix cache (its text after an image
too)."""

from __future__ import annotations

import base64
import io
from collections import defaultdict

import numpy
import pytest
import torch
from conftest import collect, finished, settle, tokens, wait_for
from PIL import Image as PILImage

import mstar
from mstar import events

PAGE = 16
PROMPT = "a red cat in a tall green hat on a wooden table by the window at dusk " * 2
#: All three guidance contexts on every step (the default interval skips the early ones).
GUIDED = {"mode": "image", "cfg_text_scale": 4.0, "cfg_img_scale": 2.0,
          "cfg_interval": [0.0, 1.0]}


@pytest.fixture(scope="module")
def dep():
    with mstar.load("bagel", preset="tiny", load_format="dummy",
                    kv_cache={"num_pages": 256, "page_size": PAGE}) as d:
        yield d


def edit_req(seed: int, steps: int = 8) -> dict:
    """An edit: with an input image, the image-free context differs from the full one, so
    all three contexts run (a prompt alone reuses the full context's velocity)."""
    return {**GUIDED, "prompt": f"picture {seed}: {PROMPT}", "image": png_data_url(seed),
            "seed": seed, "num_timesteps": steps}


def pixels(evs: list[events.Event]) -> torch.Tensor:
    (img,) = [e for e in evs if isinstance(e, events.Image)]
    return torch.from_numpy(numpy.array(PILImage.open(io.BytesIO(img.data)))).float()


def png_data_url(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    PILImage.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(
        buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def entries(dep, since: int = 0) -> list[tuple[int, dict]]:
    """(step, entry) of every LLM forward since step index `since` of the log."""
    return [(s.step, e) for s in dep.step_log("LLM")[since:] for e in s.entries]


def test_image_requests_batch_in_the_denoise_loop_over_a_prefix_prefilled_once(dep):
    reqs = [edit_req(seed) for seed in (1, 2, 3)]
    solo = [pixels(collect(dep, r)) for r in reqs]
    settle(dep)
    before = len(dep.step_log("LLM"))
    streams = [dep.generate(r) for r in reqs]  # submitted together
    together = [list(s) for s in streams]
    for evs in together:
        finished(evs)
    log = dep.step_log("LLM")[before:]
    widest = max(len({e["request_id"] for e in s.entries if e["mode"] == "scratch"})
                 for s in log)
    assert widest >= 2, "no denoise step held the latents of two requests"
    denoise_steps = reqs[0]["num_timesteps"] - 1
    for stream in streams:
        mine = [e for _, e in entries(dep, before) if e["request_id"] == stream.request_id]
        prefix: dict[str, int] = {}  # tokens in each context once prefilled
        for e in mine:
            if e["mode"] == "append":
                prefix[e["label"]] = max(prefix.get(e["label"], 0), e["context"] + e["tokens"])
        # The image and the prompt are prefilled once in the main context, the prompt once
        # in the image-free one (its own prefill); the text-free context is a fork of the
        # main one: no tokens.
        assert set(prefix) == {"main", "cfg_img"}
        scratch: dict[str, list[dict]] = defaultdict(list)
        for e in mine:
            if e["mode"] == "scratch":
                scratch[e["label"]].append(e)
        assert {k: len(v) for k, v in scratch.items()} == {
            "main": denoise_steps, "cfg_text": denoise_steps, "cfg_img": denoise_steps}
        # Every step attends to the cached prefix without appending to it.
        assert {e["context"] for e in scratch["main"]} == {prefix["main"]}
        assert {e["context"] for e in scratch["cfg_img"]} == {prefix["cfg_img"]}
        (text_free,) = {e["context"] for e in scratch["cfg_text"]}  # the image alone
        assert 0 < text_free < prefix["main"]
    for alone, batched in zip(solo, map(pixels, together)):
        assert (alone - batched).abs().max() <= 1  # uint8 levels: float rounding only
    settle(dep)


def test_the_guidance_branches_of_a_request_share_one_forward(dep):
    before = len(dep.step_log("LLM"))
    stream = dep.generate(edit_req(7, steps=4))
    finished(list(stream))
    steps = [{e["label"] for e in s.entries
              if e["request_id"] == stream.request_id and e["mode"] == "scratch"}
             for s in dep.step_log("LLM")[before:]]
    assert [labels for labels in steps if labels] == [{"main", "cfg_text", "cfg_img"}] * 3
    settle(dep)


def test_a_chat_decodes_between_the_denoise_steps_of_an_image_in_flight(dep):
    before = len(dep.step_log("LLM"))
    image = dep.generate(edit_req(11, steps=250))
    wait_for(lambda: any(e["request_id"] == image.request_id and e["mode"] == "scratch"
                         for _, e in entries(dep, before)))
    chat = dep.generate({"prompt": "say something", "max_tokens": 8, "ignore_eos": True})
    assert len(tokens(list(chat))) == 8
    def steps(rid: str, mode: str) -> list[int]:
        return [step for step, e in entries(dep, before)
                if e["request_id"] == rid and e["mode"] == mode]

    chat_steps = [step for step, e in entries(dep, before)
                  if e["request_id"] == chat.request_id and e["walk"] == "decode"]
    assert len(chat_steps) == 8
    assert min(steps(image.request_id, "scratch")) < min(chat_steps)
    # The image was still being denoised: a step of it comes after the chat's last one
    # (were it blocked behind the image, the chat would decode after all 249 of them).
    wait_for(lambda: max(steps(image.request_id, "scratch")) > max(chat_steps))
    image.close()  # cancels the rest of the denoise loop
    settle(dep)


def test_a_repeated_long_text_prompt_reuses_the_cached_prefix(dep):
    def run(request: dict) -> tuple[list[events.Event], dict[str, int]]:
        start = dep.counters()
        evs = collect(dep, request)
        finished(evs)
        return evs, {k: v - start.get(k, 0) for k, v in dep.counters().items()}

    chat = {"prompt": "Tell me: " + PROMPT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    first, grew = run(chat)
    length = grew["LLM.prompt_tokens_computed"]
    assert length > 4 * PAGE and grew.get("LLM.prefix_cache_hit_tokens", 0) == 0
    second, grew = run(chat)
    reused = (length - 1) // PAGE * PAGE  # full pages; the last prompt token runs
    assert grew["LLM.prefix_cache_hit_tokens"] == reused
    assert grew["LLM.prompt_tokens_computed"] == length - reused
    assert tokens(second) == tokens(first)
    # A question on an image: the image, then the text, one prefill walk each. The text
    # continues on the pages cached past the image's (a later chunk of a prompt adopts them
    # too, not only a sequence's first).
    look = {**chat, "image": png_data_url(3)}

    def prefills(since: int) -> list[dict]:
        return [e for _, e in entries(dep, since) if e["walk"].startswith("prefill")]

    before = len(dep.step_log("LLM"))
    first, _ = run(look)
    length = sum(e["tokens"] for e in prefills(before))  # (a new image: nothing cached)
    before = len(dep.step_log("LLM"))
    second, grew = run(look)
    image, text = prefills(before)
    assert image["walk"] == "prefill_vit" and text["context"] + text["tokens"] == length
    assert text["tokens"] == (length - 1) % PAGE + 1  # its last page's tokens only
    assert grew["LLM.prefix_cache_hit_tokens"] == text["context"] - image["tokens"]
    assert tokens(second) == tokens(first)
    # A repeated edit (same seed: the same noisy latents of its image): the text of the
    # main context and the image-free one (its own KV label) run only their last pages.
    paint = edit_req(5, steps=3)
    first, _ = run(paint)
    before = len(dep.step_log("LLM"))
    second, _ = run(paint)
    texts = {e["label"]: e for _, e in entries(dep, before)
             if e["walk"] == "prefill_text" or (e["label"], e["mode"]) == ("cfg_img", "append")}
    assert set(texts) == {"main", "cfg_img"}
    for e in texts.values():
        assert e["tokens"] == (e["context"] + e["tokens"] - 1) % PAGE + 1, e
    assert torch.equal(pixels(first), pixels(second))
    settle(dep)
