"""Qwen3-Omni's host side: media expansion into prefill items (`prompt.build_prompt`), the
Talker's host values (`prompt.talker_inputs`, after HF `generate`), and the model's
request handling (`process_prompt`, `next_walk`, sampling, bad input)."""

from __future__ import annotations

import pytest
import torch

from mstar.errors import RequestError
from mstar.model import Done, RequestState, WalkStep
from mstar_qwen3omni.model import SPEECH_SYSTEM_PROMPT, Qwen3Omni
from mstar_qwen3omni.positions import interleaved_placeholders, mrope_positions
from mstar_qwen3omni.prompt import (
    Encoded,
    build_prompt,
    media_tokens,
    prefill_schedule,
    talker_inputs,
)

MODEL = Qwen3Omni(Qwen3Omni.make_config(preset="tiny"))
CFG = MODEL.config
TOK = MODEL.tokenizer()


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def audio(tokens: int, frames: int) -> Encoded:
    return Encoded("audio", {"input_features": torch.randn(128, frames)}, tokens)


def image(grid) -> Encoded:
    return Encoded("image", {"pixel_values": torch.randn(grid[0] * grid[1] * grid[2], 1536)},
                   grid[0] * grid[1] * grid[2] // 4, grid_thw=tuple(grid))


def video(grid, second, track=None) -> Encoded:
    out = image(grid)
    out.kind, out.second_per_grid, out.audio = "video", second, track
    return out


TEXT = ("<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>What is it?"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")


def media_of(prompt, at):
    offset, shape = at
    n = 1
    for d in shape:
        n *= d
    return prompt.media[offset:offset + n].view(*shape)


def test_media_expand_into_items_that_cover_the_prompt():
    a, i, v = audio(7, 55), image([1, 4, 6]), video([2, 4, 4], 1.0)
    p = build_prompt(ids(TEXT), CFG, images=[i], audios=[a], videos=[v])
    mt = media_tokens(CFG)
    assert p.ids.count(mt.audio) == 7 and p.ids.count(mt.image) == 6
    assert p.ids.count(mt.video) == 8
    assert p.media_rows == {"audio": 7, "image": 6, "video": 8}
    assert [it["kind"] for it in p.items] == ["text", "audio", "text", "vision", "text",
                                              "vision", "text"]
    at = 0
    for item in p.items:  # consecutive, complete
        assert item["start"] == at
        at += item["length"]
        if item["kind"] != "text":  # a media item is exactly its placeholder rows
            assert set(p.ids[item["start"]:at]) <= {mt.audio, mt.image, mt.video}
    assert at == len(p.ids)
    assert torch.equal(media_of(p, p.items[1]["input_features"]), a.tensors["input_features"])
    assert torch.equal(media_of(p, p.items[5]["pixel_values"]), v.tensors["pixel_values"])
    assert p.items[5]["grid_thw"] == [2, 4, 4]
    positions, delta = mrope_positions(p.ids, mt, image_grids=[(1, 4, 6)],
                                       video_grids=[(2, 4, 4)], audio_tokens=[7],
                                       second_per_grid=[1.0])
    assert torch.equal(p.positions, positions) and p.delta == delta
    assert torch.equal(p.tokens[0], torch.tensor(p.ids)) and p.tokens.shape == (4, len(p.ids))
    assert list(prefill_schedule(p.items)) == [
        "prefill_text", "prefill_audio", "prefill_text", "prefill_vision", "prefill_text",
        "prefill_vision", "prefill_last"]


def test_video_with_its_audio_is_one_interleaved_item():
    track = audio(5, 40)
    v = video([2, 4, 4], 1.0, track)
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n" \
           "<|im_start|>assistant\n"
    p = build_prompt(ids(text), CFG, videos=[v], use_audio_in_video=True)
    mt = media_tokens(CFG)
    item = next(it for it in p.items if it["kind"] == "video_audio")
    rows = p.ids[item["start"]:item["start"] + item["length"]]
    assert rows == interleaved_placeholders((2, 4, 4), 1.0, 5, mt)
    assert p.ids[item["start"] - 2:item["start"]] == [CFG.vision_start_token_id,
                                                      CFG.audio_start_token_id]
    assert p.ids[item["start"] + item["length"]] == CFG.audio_end_token_id
    assert torch.equal(media_of(p, item["input_features"]), track.tensors["input_features"])
    assert p.media_rows == {"audio": 5, "video": 8}
    with pytest.raises(ValueError, match="no audio track"):
        build_prompt(ids(text), CFG, videos=[video([2, 4, 4], 1.0)], use_audio_in_video=True)


def test_placeholder_count_must_match_the_media():
    with pytest.raises(ValueError, match="1 image placeholder"):
        build_prompt(ids(TEXT), CFG, images=[], audios=[audio(3, 20)],
                     videos=[video([2, 4, 4], 1.0)])


def test_talker_inputs_follow_hf_generate():
    """HF: user rows are every token whose latest <|im_start|> opens a user turn (the
    marker and the turn's trailing newline included), in order; media rows take the hidden
    projection; the assistant's start is the last <|im_start|>assistant."""
    conversation = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|audio_start|><|audio_pad|><|audio_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nAgain"
                    "<|im_end|>\n<|im_start|>assistant\n")
    p = build_prompt(ids(conversation), CFG, audios=[audio(4, 30)])
    values = talker_inputs(p, CFG, "aiden")
    starts = [i for i, t in enumerate(p.ids) if t == CFG.im_start_token_id]
    turns = [(s, p.ids[s + 1]) for s in starts] + [(len(p.ids), None)]
    expected = [i for (s, role), (e, _) in zip(turns, turns[1:], strict=False)
                if role == CFG.user_token_id for i in range(s, e)]
    assert values["talker_user_rows"] == expected
    assert sum(values["talker_mm_mask"]) == 4
    assert [p.ids[r] for r, m in zip(expected, values["talker_mm_mask"], strict=True)
            if m] == [CFG.audio_token_id] * 4
    assert values["talker_assistant_start"] == starts[-1]
    assert values["talker_speaker"] == CFG.speakers["aiden"]
    assert values["talker_positions"].tolist() == [list(range(len(expected) + 9))] * 3


def test_text_request_runs_the_thinker_only():
    plan = MODEL.process_prompt({"prompt": "Hello", "max_tokens": 5})
    assert set(plan.first_walks) == {"thinker"} and set(plan.sampling) == {"Thinker"}
    step = plan.first_walks["thinker"]
    assert step.walk == "prefill_last" and step.inputs["item"] == 0
    text = TOK.decode(step.inputs["prompt"][0])
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    thinker = plan.sampling["Thinker"]
    assert (thinker.temperature, thinker.top_p, thinker.max_tokens) == (0.7, 0.9, 5)
    assert thinker.stop_token_ids == [CFG.im_end_token_id]
    assert plan.prompt_tokens == len(step.inputs["prompt"][0]) and plan.prompt_detail == ""


def test_speech_request_starts_three_partitions():
    plan = MODEL.process_prompt({"prompt": "Hello", "modalities": ["text", "audio"],
                                 "voice": "Chelsie", "max_tokens": 10, "talker_temperature": 0})
    assert set(plan.first_walks) == {"thinker", "talker", "code2wav"}
    prompt = plan.first_walks["thinker"].inputs["prompt"]
    assert TOK.decode(prompt[0]).startswith(f"<|im_start|>system\n{SPEECH_SYSTEM_PROMPT}")
    assert plan.first_walks["thinker"].walk == "prefill_last_speech"
    assert plan.params["talker_first_rows"] == prompt.shape[1] + 1
    talker = plan.first_walks["talker"].inputs
    assert talker["talker_speaker"] == CFG.speakers["chelsie"]
    assert plan.sampling["Talker"].stop_token_ids == [CFG.codec_eos_token_id]
    assert plan.sampling["Talker"].max_tokens == max(
        CFG.talker_min_frames, CFG.talker_frames_per_token * 11)
    assert plan.sampling["code_predictor"].temperature == 0  # greedy with the Talker
    defaults = MODEL.process_prompt({"prompt": "x", "modalities": ["text", "audio"]}).sampling
    assert (defaults["Talker"].temperature, defaults["Talker"].top_k,
            defaults["Talker"].repetition_penalty) == (0.9, 50, 1.05)
    assert (defaults["code_predictor"].temperature, defaults["code_predictor"].top_k,
            defaults["code_predictor"].top_p) == (1.0, 50, 0.8)


@pytest.mark.parametrize(("request_", "param"), [
    ({"prompt": "x", "modalities": ["text", "audio"], "voice": "Nobody"}, "voice"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"messages": [{"role": "system", "content": "y"}]}, "messages"),
])
def test_bad_requests_name_the_field(request_, param):
    with pytest.raises((RequestError, ValueError)) as info:
        MODEL.process_prompt(request_)
    assert getattr(info.value, "param", None) == param or param in str(info.value)
    if param == "voice":
        assert "Nobody" in str(info.value) and "Ethan" in str(info.value)


def state(walk: str, done: int, speaks=False, items=3) -> RequestState:
    kinds = ["text", "audio", "text"][:items]
    sfx = "_speech" if speaks else ""
    walks = [w + sfx for w in prefill_schedule([{"kind": k} for k in kinds])]
    return RequestState("r", {"items": [{"kind": k} for k in kinds], "walks": walks,
                              "speaks": speaks}, "thinker", walk, walks_done=walks[:done])


def test_next_walk_runs_items_in_order_then_decodes():
    prompt, media = object(), object()
    step = MODEL.next_walk(state("prefill_text", 1), {"prompt": prompt, "media": media})
    assert isinstance(step, WalkStep) and step.walk == "prefill_audio"
    assert step.inputs == {"item": 1, "prompt": prompt, "media": media}
    step = MODEL.next_walk(state("prefill_audio", 2), {"prompt": prompt, "media": media})
    assert step.walk == "prefill_last" and "media" not in step.inputs  # no media left
    step = MODEL.next_walk(state("prefill_last_speech", 3, speaks=True),
                           {"token_ids": [5], "finished": False})
    assert step.walk == "decode_speech" and step.inputs == {"input_ids": [5]}
    assert MODEL.next_walk(state("prefill_last", 3), {"finished": True,
                                                      "finish_reason": "stop"}) == Done("stop")
    assert MODEL.next_walk(state("decode", 4), {"finish_reason": "length"}) == Done("length")
    talker = RequestState("r", {}, "talker", "talker")
    assert MODEL.next_walk(talker, {"finish_reason": "stop"}) == Done("stop")
