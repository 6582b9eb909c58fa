"""Spoken chat replies (`modalities: ["text", "audio"]`) and `POST /v1/audio/transcriptions`
through a real `mstar-serve` of testvla (its consumer speaks a chat's reply; it transcribes
an audio file as a spectrogram picture, see `mstar_testvla.model`), talked to with the
official `openai` client, httpx and our SDK.

Every answer is checked against the native `/generate` of the same request (greedy, same
seed): the routes add shape and encoding, never other tokens or samples. A transcription's
text equals `/generate` of testvla's transcription prompt over the spectrogram of the file
as decoded at the model's rate (the file is at 8 kHz, the model hears 16 kHz). `/generate`
itself streams the text and the audio of one request side by side. Bad input is a 400
naming the field (audio past the duration limit a 413); a model without the capabilities
answers 400 naming them, and the SDK says so before sending; a client that leaves a
streamed spoken reply cancels it."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import av
import numpy as np
import openai
import pytest
import soundfile
from conftest import serving
from fastapi.testclient import TestClient
from serving_harness import openai_client, running_keyed, sdk_client

import mstar
from mstar import AsyncMStarClient, MStarClient
from mstar.api_server.app import create_app
from mstar.api_server.backend import ModelInfo
from mstar.client import UnsupportedCapabilityError
from mstar.config.settings import ServerSettings
from mstar.media import MediaLimits, load_audio
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-openai-audio"
RATE = 16000  # testvla's consumer, and the rate it hears at
MAX_TOKENS = 40  # past the stream edge's 16 buffered rows: audio comes before the text ends
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "seed": 0}
EXTRA = {"ignore_eos": True}  # every answer has MAX_TOKENS tokens
MESSAGES = [{"role": "user", "content": "say hi"}]
PROMPT = "user: say hi\nassistant:"  # testvla's chat template of MESSAGES
SPOKEN = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
STEP = 1 / 32768 + 1e-7  # one 16-bit step
TRANSCRIBE = {"max_completion_tokens": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_keyed(tmp_path_factory.mktemp("openai-audio"), KEY, "--config",
                       "testvla_single", "--preset", "tiny", "--load-format", "dummy") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server, KEY)


@pytest.fixture(scope="module")
def sdk(server) -> MStarClient:
    with sdk_client(server, KEY) as c:
        yield c


@pytest.fixture(scope="module")
def native(server) -> dict:
    """The text, audio and usage of the same spoken reply on `/generate`."""
    response = server.generate({"prompt": PROMPT, "modalities": ["text", "audio"], **GREEDY,
                                **EXTRA})
    assert response.status_code == 200, response.text
    answer = response.json()
    chunks = [e for e in answer["events"] if e["event"] == "audio_chunk"]
    assert chunks and {c["sample_rate"] for c in chunks} == {RATE}
    raw = b"".join(base64.b64decode(c["samples"]["data"]) for c in chunks)
    return {"text": answer["text"][0], "audio": np.frombuffer(raw, dtype=np.float32),
            "usage": answer["usage"]}


def speak(client: openai.OpenAI, fmt: str = "wav", **extra):
    return client.chat.completions.create(
        model="testvla", messages=MESSAGES, modalities=["text", "audio"],
        audio={"voice": "alloy", "format": fmt}, **GREEDY, extra_body={**EXTRA, **extra})


def decoded(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """(float32 samples, rate) by a decoder of our own choosing, not the SDK's."""
    if fmt == "pcm16":
        return np.frombuffer(data, dtype="<i2") / np.float32(32768), RATE
    if fmt in ("aac", "opus"):  # soundfile reads no AAC, nor an Opus clip of one packet
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
            return np.concatenate(frames).astype(np.float32), stream.rate
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def same_audio(samples: np.ndarray, native: np.ndarray) -> None:
    assert len(samples) == len(native)
    assert np.abs(samples - np.clip(native, -1, 1)).max() <= STEP


# -- chat with a spoken reply ----------------------------------------------------------------


def test_a_spoken_reply_is_the_models_text_and_audio(client, native):
    answer = speak(client)
    message = answer.choices[0].message
    assert message.content is None and message.role == "assistant"
    audio = message.audio
    assert audio.transcript == native["text"]
    assert audio.id.startswith("audio_") and audio.expires_at == answer.created
    samples, rate = decoded(base64.b64decode(audio.data), "wav")
    assert rate == RATE == audio.model_extra["sample_rate"]
    same_audio(samples, native["audio"])
    # usage counts the text's tokens; the audio is not tokens of the reply
    assert answer.usage.completion_tokens == MAX_TOKENS == native["usage"]["completion_tokens"]
    assert answer.usage.prompt_tokens == native["usage"]["prompt_tokens"]


@pytest.mark.parametrize("fmt", ["pcm16", "flac", "mp3", "opus", "aac"])
def test_each_format_holds_the_reply(client, native, fmt):
    audio = speak(client, fmt).choices[0].message.audio
    samples, rate = decoded(base64.b64decode(audio.data), fmt)
    if fmt != "opus":  # Opus decoders give 48 kHz whatever rate was encoded
        assert rate == audio.model_extra["sample_rate"]
    if fmt in ("pcm16", "flac"):  # lossless
        assert rate == RATE
        same_audio(samples, native["audio"])
    else:  # lossy, at the rate its codec takes: a clip at least as long
        assert len(samples) >= len(native["audio"]) * rate // RATE


def test_a_streamed_spoken_reply_is_pcm16_pieces_and_transcript_deltas(client, native):
    chunks = list(client.chat.completions.create(
        model="testvla", messages=MESSAGES, modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"}, stream=True,
        stream_options={"include_usage": True}, **GREEDY, extra_body=EXTRA))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(d.content is None for d in deltas)
    audios = [d.audio.model_dump(exclude_none=True) for d in deltas if d.audio is not None]
    pieces = [a["data"] for a in audios if "data" in a]
    assert len(pieces) > 1  # the audio streams as it is made
    assert {a["id"] for a in audios} == {f"audio_{chunks[0].id.removeprefix('chatcmpl-')}_0"}
    assert "expires_at" in audios[0] and all("expires_at" not in a for a in audios[1:])
    assert {a["sample_rate"] for a in audios if "data" in a} == {RATE}
    assert "".join(a.get("transcript", "") for a in audios) == native["text"]
    data = b"".join(base64.b64decode(p) for p in pieces)
    assert data == base64.b64decode(speak(client, "pcm16").choices[0].message.audio.data)
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_a_client_that_leaves_a_spoken_stream_cancels_the_request(server):
    body = {"model": "testvla", "messages": MESSAGES, "modalities": ["text", "audio"],
            "audio": {"format": "pcm16"}, "stream": True, **GREEDY, **EXTRA,
            "max_tokens": 460}
    with server.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        rid = response.headers["x-request-id"]
        for line in response.iter_lines():  # up to the first piece of audio
            if line.startswith("data: ") and '"data":' in line:
                break
    server.wait_idle()
    assert f"{rid} cancelled" in server.output()  # not a request that ran to its end


def test_generate_streams_text_and_audio_side_by_side(server, native):
    body = {"prompt": PROMPT, "modalities": ["text", "audio"], **GREEDY, **EXTRA,
            "stream": True}
    response = server.client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    frames = [json.loads(block.split("data: ", 1)[1]) for block in response.text.split("\n\n")
              if block.startswith("event: ")]
    kinds = [f["event"] for f in frames]
    assert kinds[-1] == "finished" and {"text_delta", "audio_chunk"} <= set(kinds)
    # backpressure holds the text until the consumer has spoken part of it
    last_text = max(i for i, kind in enumerate(kinds) if kind == "text_delta")
    assert kinds.index("audio_chunk") < last_text
    text = "".join(f["text"] for f in frames if f["event"] == "text_delta")
    audio = b"".join(base64.b64decode(f["samples"]["data"]) for f in frames
                     if f["event"] == "audio_chunk")
    assert text == native["text"]
    assert np.array_equal(np.frombuffer(audio, dtype=np.float32), native["audio"])


@pytest.mark.parametrize("change, param, words", [
    ({"stream": True}, "audio.format", "pcm16"),
    ({"audio": {"voice": "nova", "format": "wav"}}, "audio.voice", "'alloy' or 'echo'"),
    ({"audio": {"voice": "alloy", "format": "ogg"}}, "audio.format", "pcm16"),
    ({"modalities": ["text"]}, "modalities", "modalities"),
    ({"modalities": ["audio"]}, "modalities", '["text", "audio"]'),
    ({"audio": None}, "audio", "needs `audio`"),
    ({"messages": [*MESSAGES, {"role": "assistant", "audio": {"id": "audio_1"}}]},
     "messages[1].audio", "transcript"),
    ({"n": 2}, "n", "one completion"),  # testvla's own limit
])
def test_bad_spoken_chats_are_400_naming_the_field(server, change, param, words):
    body = {"model": "testvla", "messages": MESSAGES, **SPOKEN, **GREEDY, **change}
    response = server.client.post("/v1/chat/completions",
                                  json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- transcriptions --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wav() -> bytes:
    """Half a second of a falling tone at 8 kHz (the model resamples it to 16 kHz)."""
    t = np.arange(4000) / 8000
    buf = io.BytesIO()
    soundfile.write(buf, (0.5 * np.sin(2 * np.pi * (900 - 600 * t) * t)).astype(np.float32),
                    8000, format="WAV")
    return buf.getvalue()


def native_transcript(server, wav: bytes, text: str = "transcribe: ") -> str:
    """testvla's transcription as a native request: its prompt over the spectrogram of the
    file decoded at 16 kHz."""
    from mstar_testvla.model import spectrogram

    picture = spectrogram(load_audio(wav, MediaLimits(), sample_rate=RATE), 16)
    response = server.generate({"prompt": text + "<image>\nassistant:",
                                "image": picture.tolist(), "temperature": 0,
                                "max_tokens": TRANSCRIBE["max_completion_tokens"]})
    assert response.status_code == 200, response.text
    return response.json()["text"][0]


def test_a_transcription_is_the_models_text_in_json_or_plain_text(server, client, wav):
    expected = native_transcript(server, wav)
    assert expected
    answer = client.audio.transcriptions.create(model="testvla", file=("tone.wav", wav),
                                                extra_body=TRANSCRIBE)
    assert answer.text == expected
    usage = answer.usage.model_dump()
    assert usage["type"] == "tokens" and usage["output_tokens"] == 8
    plain = client.audio.transcriptions.create(model="testvla", file=("tone.wav", wav),
                                               response_format="text", extra_body=TRANSCRIBE)
    assert plain == expected
    hinted = client.audio.transcriptions.create(model="testvla", file=("tone.wav", wav),
                                                language="en", prompt="hi ",
                                                extra_body=TRANSCRIBE)
    assert hinted.text == native_transcript(server, wav, "transcribe en: hi ")


def test_a_streamed_transcription_sends_deltas_then_the_whole_text(client, wav):
    events = list(client.audio.transcriptions.create(
        model="testvla", file=("tone.wav", wav), stream=True, extra_body=TRANSCRIBE))
    *deltas, done = events
    assert deltas and {e.type for e in deltas} == {"transcript.text.delta"}
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in deltas) == done.text == client.audio.transcriptions.create(
        model="testvla", file=("tone.wav", wav), extra_body=TRANSCRIBE).text


@pytest.mark.parametrize("fields, files, param, words", [
    ({}, {"file": ("a.wav", b"RIFF not really audio")}, "file", "not audio"),
    ({}, {"file": ("a.wav", b"")}, "file", "file"),
    ({"response_format": "srt"}, None, "response_format", "timestamps"),
    ({"response_format": "vtt"}, None, "response_format", "timestamps"),
    ({"response_format": "verbose_json"}, None, "response_format", "timestamps"),
    ({"timestamp_granularities[]": "word"}, None, "timestamp_granularities", "timestamps"),
    ({"temperature": "2"}, None, "temperature", "less than or equal"),
    ({}, {"prompt": (None, "no file")}, "file", "`file`"),
    ({}, {"audio": ("a.wav", b"x")}, "audio", "unexpected: audio"),
    ({"max_completion_tokens": "1000"}, None, "max_completion_tokens", "max_seq_len"),
])
def test_bad_transcriptions_are_400_naming_the_field(server, wav, fields, files, param, words):
    files = {"file": ("tone.wav", wav)} if files is None else files
    response = server.client.post("/v1/audio/transcriptions",
                                  data={"model": "testvla", **fields}, files=files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- the SDK ---------------------------------------------------------------------------------


def test_sdk_chat_speaks_whole_and_streamed(sdk, native):
    answer = sdk.chat("say hi", audio_out=True, voice="alloy", **GREEDY, **EXTRA)
    assert answer.text == native["text"]
    speech = answer.choices[0].audio
    assert speech.format == "wav" and speech.sample_rate == RATE
    same_audio(speech.samples(), native["audio"])
    deltas = list(sdk.chat("say hi", audio_out=True, stream=True, **GREEDY, **EXTRA))
    assert "".join(d.text for d in deltas) == native["text"]
    pieces = [d.audio for d in deltas if d.audio is not None]
    assert len(pieces) > 1 and {(p.format, p.sample_rate) for p in pieces} == {("pcm", RATE)}
    same_audio(np.concatenate([p.samples() for p in pieces]), native["audio"])
    with pytest.raises(ValueError, match="audio_out"):
        sdk.chat("say hi", voice="alloy")


def test_sdk_transcribes_a_path_or_bytes(server, sdk, native, wav, tmp_path):
    expected = native_transcript(server, wav)
    path = tmp_path / "tone.wav"
    path.write_bytes(wav)
    assert sdk.transcribe(path, **TRANSCRIBE) == expected
    assert sdk.transcribe(str(path), **TRANSCRIBE) == expected
    assert sdk.transcribe(wav, **TRANSCRIBE) == expected

    async def run() -> tuple[str, str]:
        async with AsyncMStarClient(server.url, api_key=KEY, max_retries=0) as c:
            spoken = await c.chat("say hi", audio_out=True, **GREEDY, **EXTRA)
            return await c.transcribe(wav, **TRANSCRIBE), spoken.text

    assert asyncio.run(run()) == (expected, native["text"])


# -- in process: capabilities and limits ----------------------------------------------------


@pytest.fixture(scope="module")
def deployment():
    with mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=64) as d:
        yield d


class _Silent(LocalBackend):
    """testvla as a model that neither speaks nor transcribes."""

    def model_info(self) -> ModelInfo:
        info = super().model_info()
        return {**info, "capabilities": [c for c in info["capabilities"]
                                         if c not in ("audio_output", "transcription")]}


def test_a_model_without_the_capabilities_answers_400_naming_them(deployment, wav):
    with TestClient(create_app(_Silent(deployment), ServerSettings(api_key=None))) as http:
        chat = http.post("/v1/chat/completions", json={
            "model": "testvla", "messages": MESSAGES, **SPOKEN})
        text = http.post("/v1/chat/completions", json={
            "model": "testvla", "messages": MESSAGES, "max_tokens": 2})
        transcription = http.post("/v1/audio/transcriptions", data={"model": "testvla"},
                                  files={"file": ("tone.wav", wav)})
    assert text.status_code == 200, text.text
    for response, param, capability in ((chat, "modalities", "audio_output"),
                                        (transcription, "model", "transcription")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == "unsupported_capability"
        assert f"'{capability}'" in error["message"] and "chat" in error["message"]


def test_sdk_methods_name_the_capability_the_model_lacks(deployment, wav):
    with serving(create_app(_Silent(deployment), ServerSettings(api_key=None))) as http:
        with MStarClient(str(http.base_url).rstrip("/"), max_retries=0) as c:
            with pytest.raises(UnsupportedCapabilityError, match="'audio_output'"):
                c.chat("hi", audio_out=True)
            with pytest.raises(UnsupportedCapabilityError, match="'transcription'"):
                c.transcribe(wav)
            assert c.chat("hi", max_tokens=2).text is not None  # text chat still served


def test_audio_past_the_duration_limit_is_413_naming_file(deployment, wav):
    """The file is decoded in the data worker within the server's media limits (the
    tone is half a second)."""
    settings = ServerSettings(api_key=None, media_max_audio_seconds=0.25)
    with TestClient(create_app(LocalBackend(deployment), settings)) as http:
        response = http.post("/v1/audio/transcriptions", data={"model": "testvla"},
                             files={"file": ("tone.wav", wav)})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and "0.25" in error["message"], error
