"""`POST /v1/audio/speech` through a real `mstar-serve` of testvla (its consumer streams the
audio of a text prompt), talked to with the official `openai` client, httpx and our SDK.

Every format is decoded by an independent decoder (soundfile; PyAV for AAC and for a
streamed FLAC, which states no length; numpy for raw pcm) and compared with the audio
chunks the native `/generate` gives for the same request (greedy, same seed): the route
adds a container, never other samples. Streams are checked to arrive in pieces that make
the same file, SSE to follow OpenAI's event shapes, bad requests to be 400s naming the
field, and a client that leaves to cancel its request."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile
from fastapi.testclient import TestClient
from serving_harness import openai_client, running_keyed, sdk_client

import mstar
from mstar import AsyncMStarClient, MStarClient
from mstar.api_server.app import create_app
from mstar.api_server.backend import ModelInfo
from mstar.client import BadRequestError
from mstar.config.settings import ServerSettings
from mstar.media.audio_out import FORMATS
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-speech"
TEXT = "say hello"
RATE = 16000  # testvla's consumer
GREEDY = {"temperature": 0, "max_tokens": 100, "ignore_eos": True, "seed": 0}
STEP = 1 / 32768 + 1e-7  # one 16-bit step
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
               "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_keyed(tmp_path_factory.mktemp("speech-server"), KEY, "--config",
                       "testvla_single", "--preset", "tiny", "--load-format", "dummy") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server, KEY)


@pytest.fixture(scope="module")
def native(server) -> np.ndarray:
    """The concatenated audio chunks of the same request on `/generate`."""
    response = server.generate({"input": TEXT, "voice": "alloy", **GREEDY})
    assert response.status_code == 200, response.text
    chunks = [e for e in response.json()["events"] if e["event"] == "audio_chunk"]
    assert chunks and {c["sample_rate"] for c in chunks} == {RATE}
    raw = b"".join(base64.b64decode(c["samples"]["data"]) for c in chunks)
    return np.frombuffer(raw, dtype=np.float32)


@pytest.fixture(scope="module")
def sdk(server) -> MStarClient:
    with sdk_client(server, KEY) as c:
        yield c


def speak(client: openai.OpenAI, fmt: str, **extra) -> tuple[bytes, httpx.Headers]:
    answer = client.audio.speech.create(model="testvla", input=TEXT, voice="alloy",
                                        response_format=fmt, extra_body={**GREEDY, **extra})
    return answer.content, answer.response.headers


def decoded(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """(float32 samples, rate) by a decoder of our own choosing, not the SDK's."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2") / np.float32(32768), RATE
    if fmt in ("aac", "flac"):  # soundfile reads neither AAC nor a FLAC of unknown length
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
            scale = 32768 if frames[0].dtype == np.int16 else 1
            return np.concatenate(frames).astype(np.float32) / scale, stream.rate
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def frames_of(n: int, delay: int, frame: int) -> int:
    """Samples a decoder gives for `n` behind `delay` priming samples, in whole frames."""
    return -(-(n + delay) // frame) * frame


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_holds_the_models_audio(client, native, fmt):
    data, headers = speak(client, fmt)
    assert headers["content-type"] == MEDIA_TYPES[fmt]
    assert headers["x-sample-rate"] == str(RATE)
    samples, rate = decoded(data, fmt)
    assert rate == RATE
    n = len(native)
    if fmt in ("wav", "pcm", "flac"):
        assert len(samples) == n
        assert np.abs(samples - np.clip(native, -1, 1)).max() <= STEP
    elif fmt == "mp3":  # a stream has no room for the encoder delay (see audio_out)
        assert len(samples) == frames_of(n, 1105, 576)
    elif fmt == "aac":
        assert len(samples) == frames_of(n, 1024, 1024)
    else:  # Ogg Opus: exact through its pre-skip and granule positions
        assert len(samples) == n


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "flac"])
def test_a_streamed_answer_comes_in_pieces_that_make_the_same_file(client, fmt):
    with client.audio.speech.with_streaming_response.create(
            model="testvla", input=TEXT, voice="alloy", response_format=fmt,
            extra_body=GREEDY) as response:
        pieces = list(response.iter_bytes())
    if fmt in ("pcm", "wav"):  # every audio chunk is sent as it comes
        assert len(pieces) > 1
    assert b"".join(pieces) == speak(client, fmt)[0]


def test_sse_follows_openais_event_shapes(server, client):
    body = {"model": "testvla", "input": TEXT, "response_format": "wav",
            "stream_format": "sse", **GREEDY}
    response = server.client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    frames = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
    *deltas, done = frames
    assert deltas and {f["type"] for f in deltas} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(f["audio"]) for f in deltas)
    assert audio == speak(client, "wav")[0]
    prompt_tokens = len(TEXT.encode()) + 1  # BOS
    assert done == {"type": "speech.audio.done", "usage": {
        "input_tokens": prompt_tokens, "output_tokens": GREEDY["max_tokens"],
        "total_tokens": prompt_tokens + GREEDY["max_tokens"]}}


def test_speed_shortens_the_audio(client, native):
    fast, _ = speak(client, "pcm", speed=2.0)
    assert 0 < len(fast) // 2 < 0.75 * len(native)


@pytest.mark.parametrize("change, param, words", [
    ({"input": ""}, "input", "non-empty"),
    ({"input": " \n\t"}, "input", "non-empty"),
    ({"input": 5}, "input", "string"),
    ({"response_format": "ogg"}, "response_format", "mp3, opus, aac, flac, wav, pcm"),
    ({"stream_format": "chunks"}, "stream_format", "audio, sse"),
    ({"instructions": "speak softly"}, "instructions", "not supported"),
    ({"speed": "fast"}, "speed", "number"),
    ({"speed": 8}, "speed", "4"),
    ({"voice": {"id": "voice_1"}}, "voice", "string"),
    ({"max_tokens": 0}, "max_tokens", "greater than"),
    ({"voice": "nova"}, "voice", "'alloy' or 'echo'"),  # the model's request_schema
    ({"input": "word " * 200}, "input", "max_seq_len"),
    ({"max_token": 5}, "max_token", "Unrecognized request argument"),
    ({"max_tokens": "5"}, "max_tokens", "integer"),
])
def test_bad_requests_are_400_naming_the_field(client, change, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="testvla", input=TEXT, voice="alloy",
                                   extra_body=change)
    error = info.value
    assert error.status_code == 400 and error.param == param
    assert words in error.message


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.audio.speech.create(model="tts-1", input=TEXT, voice="alloy")
    assert info.value.code == "model_not_found"


class _WithoutSpeech(LocalBackend):
    """testvla as a model that does not declare "speech"."""

    def model_info(self) -> ModelInfo:
        info = super().model_info()
        return {**info, "capabilities": [c for c in info["capabilities"] if c != "speech"]}


def test_a_model_without_speech_answers_400_naming_its_capabilities():
    deployment = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=64)
    try:
        app = create_app(_WithoutSpeech(deployment), ServerSettings(api_key=None))
        with TestClient(app) as http:
            response = http.post("/v1/audio/speech", json={"model": "testvla", "input": "hi"})
    finally:
        deployment.close()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "speech" in error["message"]
    assert "chat, completions" in error["message"] and error["param"] == "model"


class _SpeechOnly(LocalBackend):
    """testvla as a model that declares only "speech" (as Orpheus does)."""

    def model_info(self) -> ModelInfo:
        return {**super().model_info(), "capabilities": ["speech"]}


def test_chat_on_a_speech_only_model_answers_400_naming_its_capabilities():
    deployment = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=64)
    try:
        app = create_app(_SpeechOnly(deployment), ServerSettings(api_key=None))
        with TestClient(app) as http:
            chat = http.post("/v1/chat/completions", json={
                "model": "testvla", "messages": [{"role": "user", "content": "hi"}]})
            completion = http.post("/v1/completions", json={"model": "testvla",
                                                            "prompt": "hi"})
    finally:
        deployment.close()
    for response, route in ((chat, "/v1/chat/completions"), (completion, "/v1/completions")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "model" and error["code"] == "unsupported_capability"
        assert route in error["message"] and "its capabilities: speech" in error["message"]


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_client_that_leaves_mid_stream_cancels_the_request(server, stream_format):
    body = {"model": "testvla", "input": TEXT, "response_format": "pcm",
            "stream_format": stream_format, **GREEDY, "max_tokens": 480}
    with server.client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        rid = response.headers["x-request-id"]
        assert next(response.iter_raw())
    server.wait_idle()
    assert f"{rid} cancelled" in server.output()  # not a request that ran to its end


# -- the SDK ------------------------------------------------------------------------------------
def test_sdk_tts_returns_the_audio_and_writes_a_wav(sdk, native, tmp_path):
    speech = sdk.tts(TEXT, voice="echo", format="flac", **GREEDY)
    assert speech.format == "flac" and speech.sample_rate == RATE and speech.request_id
    assert np.abs(speech.samples() - np.clip(native, -1, 1)).max() <= STEP
    path = speech.to_wav(tmp_path / "hello.wav")
    written, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE and np.array_equal(written, speech.samples())
    mp3 = sdk.tts(TEXT, format="mp3", **GREEDY)
    assert mp3.sample_rate == RATE and len(mp3.samples()) == frames_of(len(native), 1105, 576)
    pcm = sdk.tts(TEXT, format="pcm", **GREEDY)  # no header: the rate from x-sample-rate
    assert pcm.sample_rate == RATE and len(pcm.samples()) == len(native)


def test_sdk_tts_streams_the_same_bytes(sdk, server):
    whole = sdk.tts(TEXT, format="wav", **GREEDY).audio
    pieces = list(sdk.tts(TEXT, format="wav", stream=True, **GREEDY))
    assert len(pieces) > 1 and b"".join(pieces) == whole

    async def run() -> tuple[bytes, bytes]:
        async with AsyncMStarClient(server.url, api_key=KEY, max_retries=0) as aclient:
            speech = await aclient.tts(TEXT, format="opus", **GREEDY)
            stream = await aclient.tts(TEXT, format="opus", stream=True, **GREEDY)
            return speech.audio, b"".join([piece async for piece in stream])

    whole_opus, streamed_opus = asyncio.run(run())
    assert whole_opus == streamed_opus == sdk.tts(TEXT, format="opus", **GREEDY).audio


def test_sdk_tts_errors_and_leaving_a_stream(sdk, server):
    with pytest.raises(BadRequestError) as info:
        sdk.tts(TEXT, voice="nova")
    assert "'alloy' or 'echo'" in info.value.message
    with sdk.tts(TEXT, format="pcm", stream=True, **{**GREEDY, "max_tokens": 480}) as stream:
        assert next(stream)
        rid = stream.request_id
    server.wait_idle()
    assert f"{rid} cancelled" in server.output()
