"""The outputs of a non-streamed `/generate` through a real `mstar-serve` of testvla: the
`outputs` of the JSON answer (actions, rollout frames, speech audio) against the events of
the same answer, the safetensors answer (`Accept: application/vnd.safetensors`, read with
the safetensors package) against the JSON one, and the SDK's typed results (numpy arrays,
`Audio`, `binary=True`, `act`) sync and async, and the answer's `timing`. A model without a capability (testvla with
its capabilities cut, served in-process) makes `act` and `tts` raise before sending."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from conftest import serving
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors
from serving_harness import Server, running

import mstar
from mstar import events
from mstar.api_server.app import create_app
from mstar.api_server.backend import ModelInfo
from mstar.client import (
    AsyncMStarClient,
    Audio,
    GenerateResponse,
    MStarClient,
    UnsupportedCapabilityError,
)
from mstar.config.settings import ServerSettings
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(120)

SAFETENSORS = "application/vnd.safetensors"
ACT = {"prompt": "pick up", "mode": "act", "num_steps": 2, "seed": 4}
ROLLOUT = {"prompt": "go", "mode": "rollout", "num_frames": 3, "seed": 1,
           "frame": np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8).tolist()}
SPEECH = {"input": "say hello", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
          "seed": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("outputs"), "--config", "testvla_single",
                 "--preset", "tiny", "--load-format", "dummy") as srv:
        yield srv


@pytest.fixture
def client(server):
    with MStarClient(server.url) as c:
        yield c


def post(server: Server, body: dict, accept: str | None = None) -> httpx.Response:
    response = server.client.post("/generate", json=body,
                                  headers={"Accept": accept} if accept else {})
    assert response.status_code == 200, response.text
    return response


def array(value: dict) -> np.ndarray:
    """A tensor of the JSON answer, decoded here with numpy (float32 outputs only)."""
    assert value["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(value["data"]), "<f4").reshape(value["shape"])


def event_tensors(answer: dict, name: str) -> list[np.ndarray]:
    return [array(e["tensor"]) for e in answer["events"]
            if e["event"] == "tensor" and e["name"] == name]


# -- the JSON answer ----------------------------------------------------------------------
def test_the_json_answer_names_the_action_chunk_of_its_event(server):
    answer = post(server, ACT).json()
    (event,) = [e for e in answer["events"] if e["event"] == "tensor"]
    assert answer["outputs"] == {"actions": event["tensor"]}
    assert array(answer["outputs"]["actions"]).shape == (4, 4)
    assert post(server, {"prompt": "hi", "max_tokens": 2}).json()["outputs"] == {}


def test_rollout_frames_are_one_output_concatenated_along_the_first_axis(server):
    answer = post(server, ROLLOUT).json()
    frames = event_tensors(answer, "frame")
    assert len(frames) == 3 and len({f.tobytes() for f in frames}) == 3
    np.testing.assert_array_equal(array(answer["outputs"]["frame"]), np.concatenate(frames))


def test_speech_audio_is_one_output_of_the_chunks_with_their_rate(server):
    answer = post(server, SPEECH).json()
    chunks = [e for e in answer["events"] if e["event"] == "audio_chunk"]
    assert len(chunks) > 1 and {c["sample_rate"] for c in chunks} == {16000}
    audio = answer["outputs"]["audio"]
    assert audio["sample_rate"] == 16000
    np.testing.assert_array_equal(array(audio),
                                  np.concatenate([array(c["samples"]) for c in chunks]))


def test_the_answer_says_how_long_the_request_took(server, client, tmp_path):
    """`timing`: from the server's receipt to the first output and to the finish, in the
    JSON answer, the safetensors metadata and the SDK's results."""
    for body in (ACT, SPEECH):
        timing = post(server, body).json()["timing"]
        assert set(timing) == {"total_ms", "first_output_ms"}
        assert 0 < timing["first_output_ms"] <= timing["total_ms"]
    (tmp_path / "answer.safetensors").write_bytes(post(server, ACT, SAFETENSORS).content)
    with safe_open(tmp_path / "answer.safetensors", "numpy") as f:
        assert set(json.loads(f.metadata()["timing"])) == {"total_ms", "first_output_ms"}
    for binary in (False, True):
        assert set(client.generate(ACT, binary=binary).timing) == {"total_ms",
                                                                    "first_output_ms"}


# -- the safetensors answer ---------------------------------------------------------------
@pytest.mark.parametrize("body", [ACT, ROLLOUT, SPEECH], ids=["act", "rollout", "speech"])
def test_the_safetensors_answer_holds_the_json_outputs(server, body, tmp_path):
    answer = post(server, body).json()
    response = post(server, body, accept=SAFETENSORS)
    assert response.headers["content-type"] == SAFETENSORS
    tensors = load_safetensors(response.content)
    assert tensors.keys() == answer["outputs"].keys()
    for name, value in answer["outputs"].items():
        np.testing.assert_array_equal(tensors[name], array(value))
    (tmp_path / "answer.safetensors").write_bytes(response.content)
    with safe_open(tmp_path / "answer.safetensors", "numpy") as f:
        metadata = f.metadata()
    assert metadata["id"] == response.headers["x-request-id"]
    assert metadata["finish_reason"] == answer["finish_reason"]
    assert json.loads(metadata["usage"]) == answer["usage"]
    assert json.loads(metadata.get("text", "[]")) == answer.get("text", [])


@pytest.mark.parametrize("accept", [None, "application/json", "*/*",
                                    f"application/json, {SAFETENSORS}",
                                    f"{SAFETENSORS};q=0, */*"])
def test_json_and_wildcards_keep_the_json_answer(server, accept):
    response = post(server, ACT, accept=accept)
    assert response.headers["content-type"] == "application/json"
    assert "actions" in response.json()["outputs"]


@pytest.mark.parametrize("accept", [SAFETENSORS, f"application/json;q=0.5, {SAFETENSORS}",
                                    f"{SAFETENSORS}, */*"])
def test_a_preferred_safetensors_type_gets_the_binary_answer(server, accept):
    assert post(server, ACT, accept=accept).headers["content-type"] == SAFETENSORS


# -- the SDK ------------------------------------------------------------------------------
def test_sdk_outputs_are_numpy_arrays_and_audio(client, server):
    acted = client.act(prompt="pick up", mode="act", num_steps=2, seed=4)
    assert isinstance(acted, np.ndarray) and acted.shape == (4, 4)
    wire = post(server, ACT).json()["outputs"]
    np.testing.assert_array_equal(acted, array(wire["actions"]))
    generated = client.generate(ACT)
    assert isinstance(generated, GenerateResponse) and generated.finish_reason == "stop"
    (event,) = [e for e in generated.events if isinstance(e, events.NamedTensor)]
    np.testing.assert_array_equal(acted, event.tensor.to_tensor().numpy())
    spoken = client.generate(SPEECH)
    audio = spoken.outputs["audio"]
    assert isinstance(audio, Audio) and audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32
    chunks = [e.samples.to_tensor().numpy() for e in spoken.events
              if isinstance(e, events.AudioChunk)]
    np.testing.assert_array_equal(audio.samples, np.concatenate(chunks))


@pytest.mark.parametrize("body", [ACT, SPEECH], ids=["act", "speech"])
def test_sdk_binary_answer_equals_the_json_one(client, body):
    whole, binary = client.generate(body), client.generate(body, binary=True)
    assert binary.events == [] and binary.id == binary.request_id
    assert (binary.finish_reason, binary.usage, binary.text) == \
        (whole.finish_reason, whole.usage, whole.text)
    assert binary.outputs.keys() == whole.outputs.keys()
    for name, value in whole.outputs.items():
        if isinstance(value, Audio):
            assert binary.outputs[name].sample_rate == value.sample_rate
            value, got = value.samples, binary.outputs[name].samples
        else:
            got = binary.outputs[name]
        np.testing.assert_array_equal(got, value)


def test_async_sdk_acts_and_reads_the_binary_answer(server, client):
    expected = client.act(ACT)

    async def main() -> tuple[np.ndarray, np.ndarray, list[events.Event]]:
        async with AsyncMStarClient(server.url) as c:
            acted = await c.act(ACT)
            binary = await c.act(ACT, binary=True)
            streamed = [e async for e in await c.generate(ACT, stream=True)]
            return acted, binary, streamed

    acted, binary, streamed = asyncio.run(main())
    np.testing.assert_array_equal(acted, expected)
    np.testing.assert_array_equal(binary, expected)
    assert [type(e) for e in streamed] == [events.NamedTensor, events.Finished]


# -- capabilities -------------------------------------------------------------------------
class _TextOnly(LocalBackend):
    """testvla as a model that declares neither "actions" nor "speech"."""

    def model_info(self) -> ModelInfo:
        info = super().model_info()
        return {**info, "capabilities": [c for c in info["capabilities"]
                                         if c not in ("actions", "speech")]}


def test_sdk_inputs_reach_the_model_as_the_server_decodes_them(client, tmp_path):
    """What the SDK sends for arrays, PIL images and files (inline, and a large image as a
    multipart file part) gives the model the same inputs as the plain JSON forms."""
    from PIL import Image

    frame = np.asarray(ROLLOUT["frame"], dtype=np.float32)
    as_lists = client.generate(ROLLOUT).outputs["frame"]
    as_array = client.generate({**ROLLOUT, "frame": frame}).outputs["frame"]
    np.testing.assert_array_equal(as_array, as_lists)
    np.testing.assert_array_equal(
        client.generate({**ROLLOUT, "frame": frame + 1}).outputs["frame"] != as_lists,
        np.ones_like(as_lists, dtype=bool))

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8))
    path = tmp_path / "big.png"
    big.save(path)
    assert path.stat().st_size > 1 << 20  # over the SDK's inline limit: a file part
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    act = {**ACT, "prompt": "<image> pick up"}
    expected = client.act({**act, "image": url})
    for image in (big, path, path.read_bytes(), np.asarray(big)):
        np.testing.assert_array_equal(client.act({**act, "image": image}), expected)
    other = Image.fromarray(255 - np.asarray(big))
    assert not np.array_equal(client.act({**act, "image": other}), expected)
    # a dict of cameras: each one sent as its own part or inline
    cams = {"left": big, "right": np.asarray(other)}
    by_name = client.act({**act, "cameras": cams})
    as_list = client.act({**act, "cameras": [url, other]})
    np.testing.assert_array_equal(by_name, as_list)
    assert not np.array_equal(by_name, client.act({**act, "cameras": [other, big]}))


def test_model_methods_name_the_capability_the_model_lacks():
    deployment = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=64)
    try:
        app = create_app(_TextOnly(deployment), ServerSettings(api_key=None))
        with serving(app) as http:
            url = str(http.base_url).rstrip("/")
            with MStarClient(url) as c:
                with pytest.raises(UnsupportedCapabilityError) as info:
                    c.act(ACT)
                assert "'actions'" in str(info.value) and "act()" in str(info.value)
                assert "'testvla'" in str(info.value) and "chat" in str(info.value)
                with pytest.raises(UnsupportedCapabilityError, match="'speech'"):
                    c.tts("hi")
                assert c.generate(ACT).outputs["actions"].shape == (4, 4)  # still served

            async def main() -> None:
                async with AsyncMStarClient(url) as ac:
                    with pytest.raises(UnsupportedCapabilityError, match="'actions'"):
                        await ac.act(ACT)

            asyncio.run(main())
            metrics = http.get("/metrics").text
    finally:
        deployment.close()
    # the refused calls never reached /generate: only the one generate() was counted
    counted = [(s.labels, s.value) for family in text_string_to_metric_families(metrics)
               for s in family.samples if s.name == "mstar_requests_total" and s.value]
    assert counted == [({"status": "ok"}, 1.0)]
