"""The SDK's world-model calls (`encode_video`, `rollout`, `plan`) at the encoding level: the
`/generate` body each builds (decoded by independent readers: json, msgspec into
`mstar.events.TensorData`, the stdlib's MIME parser), and the arrays read back from answers
written by the server's own encoders (`api_server.app`'s JSON answer and SSE frames). The
calls against a served V-JEPA 2 are in tests/e2e/test_vjepa2_serving.py."""

from __future__ import annotations

import base64
import json

import httpx
import msgspec
import numpy as np
import pytest
import torch
from test_sdk_encoding import as_torch, parts, sent

from mstar import events
from mstar.api_server.app import _result, _sse_frame
from mstar.client import _protocol as protocol
from mstar.client import _world_model as world
from mstar.client._payload import INLINE_LIMIT, generate_payload
from mstar.client.errors import BadRequestError, MStarError

#: The first bytes of an MP4 (its `ftyp` box): the SDK types media by content.
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(range(64))
FRAMES = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)


def body_of(fields: dict) -> dict:
    return json.loads(sent(generate_payload(None, fields, stream=False)).content)


def test_a_clip_goes_as_video_media_or_as_a_frames_tensor(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(MP4)
    data_url = "data:video/mp4;base64," + base64.b64encode(MP4).decode()
    for given in (path, str(path), MP4):
        body = body_of(world.encode_fields(given, {"fps": 4}))
        assert body == {"video": data_url, "mode": "encode", "fps": 4, "stream": False}
    for url in ("https://example.com/clip.mp4", data_url):
        assert body_of(world.encode_fields(url, {}))["video"] == url
    body = body_of(world.encode_fields(FRAMES, {}))
    assert "video" not in body and body["mode"] == "encode"
    assert torch.equal(as_torch(body["frames"]), torch.from_numpy(FRAMES))
    # a clip over the inline limit travels as a file part named by its field
    big = MP4 + bytes(INLINE_LIMIT)
    request = sent(generate_payload(None, world.encode_fields(big, {}), stream=False))
    got = parts(request)
    assert got["video"] == ("video.mp4", "video/mp4", big)
    assert json.loads(got["request"][2]) == {"mode": "encode", "stream": False}


def test_rollout_and_plan_fields_leave_unset_ones_to_the_server():
    actions = np.full((3, 7), 0.01, np.float32)
    states = np.zeros((2, 7), np.float32)
    body = body_of(world.rollout_fields(FRAMES, actions, states, 3, {"seed": 2}))
    assert body["mode"] == "rollout" and body["rollout_steps"] == 3 and body["seed"] == 2
    assert torch.equal(as_torch(body["actions"]), torch.from_numpy(actions))
    assert torch.equal(as_torch(body["states"]), torch.from_numpy(states))
    assert "rollout_steps" not in body_of(world.rollout_fields(FRAMES, actions, None, None,
                                                               {}))
    body = body_of(world.plan_fields(FRAMES, FRAMES[-1:], states, {}, samples=16,
                                     iterations=2, horizon=None, topk=None))
    assert body["mode"] == "plan" and (body["samples"], body["iterations"]) == (16, 2)
    assert "horizon" not in body and "topk" not in body
    assert torch.equal(as_torch(body["goal"]), torch.from_numpy(FRAMES[-1:]))
    with pytest.raises(ValueError, match="goal is required"):
        world.plan_fields(FRAMES, None, states, {})


def step(i: int, shape: tuple[int, ...] = (5, 3)) -> events.NamedTensor:
    latents = torch.arange(15, dtype=torch.float32).reshape(shape) + 100 * i
    return events.NamedTensor(world.ROLLOUT_OUTPUT, events.TensorData.from_tensor(latents))


def server_answer(collected: list[events.Event]) -> httpx.Response:
    """The non-streamed JSON answer as the server writes it."""
    sent_back = _result("r1", collected, binary=False, timing={"total_ms": 1.0})
    return httpx.Response(200, content=sent_back.body, headers={
        "content-type": "application/json", "x-request-id": "r1"})


def test_a_rollout_answer_is_its_steps_stacked():
    poses = events.NamedTensor("poses", events.TensorData.from_tensor(torch.zeros(3, 7)))
    collected = [*(step(i, (1, 5, 3)) for i in range(3)), poses,
                 events.Finished("stop", events.Usage(0, 0))]
    answer = protocol.parse_generate(server_answer(collected))
    got = world.rollout_steps(answer)
    assert got.shape == (3, 5, 3) and got.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(got[i], np.arange(15).reshape(5, 3) + 100 * i)
    np.testing.assert_array_equal(world.output(answer, "poses"), np.zeros((3, 7)))
    empty = protocol.parse_generate(server_answer([poses, collected[-1]]))
    with pytest.raises(MStarError, match="no 'rollout' output .*poses"):
        world.rollout_steps(empty)


def test_a_streamed_rollout_yields_each_step_as_its_frame_arrives():
    reader = protocol.FrameReader(world.ROLLOUT.parse_frame, "r2")
    frames = [_sse_frame(e) for e in (step(0), step(1, (1, 5, 3)))]
    got = [item for frame in frames for line in frame.decode().split("\n")
           for item in reader.feed(line)]
    assert [g.shape for g in got] == [(5, 3), (5, 3)]
    np.testing.assert_array_equal(got[1], np.arange(15).reshape(5, 3) + 100)
    error = events.Error("actions must be [N, 7]", code=400, type="invalid_request_error",
                         param="actions")
    with pytest.raises(BadRequestError, match=r"\[N, 7\]") as raised:
        for line in _sse_frame(error).decode().split("\n"):
            reader.feed(line)
    assert raised.value.param == "actions" and raised.value.request_id == "r2"
    assert msgspec.json.decode(_sse_frame(step(0)).split(b"data: ")[1])["name"] == "rollout"
