"""Qwen3-Omni served (`mstar-serve qwen3_omni --preset tiny --load-format dummy`, the
default 2-rank layout) through the official `openai` client: a chat with image and audio
parts answering in text and speech (whole and streamed pcm16), a transcription, the
model's 400 for an unknown voice, the seed-003 chat examples as written, and where each
part ran (per-rank counters: encoders and Thinker on rank 1, Talker and Code2Wav on 0)."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import soundfile
from placement_check import by_rank
from serving_harness import running

from mstar import MStarClient

pytestmark = pytest.mark.timeout(120)

MODEL = "qwen3_omni"
GREEDY = {"temperature": 0, "max_tokens": 4, "seed": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("qwen3omni"), "--config", "qwen3omni_2gpu",
                 "--preset", "tiny",
                 "--load-format", "dummy", "--set", "max_seq_len=1024",
                 "--media-max-video-seconds", "2") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), rate,
                    format="WAV")
    return out.getvalue()


def png() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype("uint8")).save(
        out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


MESSAGES = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": png()}},
    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav()).decode(),
                                            "format": "wav"}},
    {"type": "text", "text": "What do you see and hear?"}]}]


def test_chat_with_media_answers_in_text_and_speech(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, modalities=["text", "audio"],
        audio={"voice": "chelsie", "format": "wav"}, **GREEDY)
    audio = answer.choices[0].message.audio
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")
    assert rate == 24000 and len(samples) > 1920 and float(np.abs(samples).max()) > 0.01
    assert audio.transcript and answer.usage.completion_tokens == 4
    streamed = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, modalities=["text", "audio"],
        audio={"voice": "chelsie", "format": "pcm16"}, stream=True, **GREEDY)
    pieces = [dict(c.choices[0].delta.audio) for c in streamed
              if c.choices and getattr(c.choices[0].delta, "audio", None)]
    pcm = b"".join(base64.b64decode(p["data"]) for p in pieces if p.get("data"))
    transcript = "".join(p.get("transcript") or "" for p in pieces)
    assert transcript == audio.transcript
    assert len(pcm) // 2 == len(samples)  # the same reply, streamed as 16-bit pieces


def test_text_chat_and_transcription(client):
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens == 4
    text = client.audio.transcriptions.create(model=MODEL, file=("tone.wav", wav()),
                                              extra_body={"max_completion_tokens": 3})
    assert isinstance(text.text, str)


def test_unknown_voice_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                       modalities=["text", "audio"],
                                       audio={"voice": "nobody", "format": "wav"}, **GREEDY)
    assert info.value.body["param"] == "audio.voice" and "Ethan" in info.value.body["message"]


def test_seed_examples_run_as_written(server):
    client = MStarClient(server.url)
    assert isinstance(client.chat("What is the capital of France?").text, str)  # text
    for event in client.chat("Tell me a story", stream=True):  # streaming
        print(getattr(event, "text", ""), end="", flush=True)
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    answer = client.chat.completions.create(model="qwen3_omni",
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content is not None


def test_each_part_ran_where_the_layout_places_it(server, client):
    """A spoken chat over an image and a clip, then a text-only one: every node ran on its
    rank only, and the text-only request left the Talker's and Code2Wav's counters alone."""
    def ran() -> dict[str, dict[int, float]]:
        server.wait_reported()
        counts: dict[str, dict[int, float]] = {}
        for (rank, node, _walk), count in by_rank(server, "mstar_node_invocations_total",
                                                  "node", "walk").items():
            counts.setdefault(node, {}).setdefault(rank, 0.0)
            counts[node][rank] += count
        return counts

    client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                   modalities=["text", "audio"],
                                   audio={"voice": "ethan", "format": "wav"}, **GREEDY)
    spoken = ran()
    where = {node: {r for r, c in by.items() if c > 0} for node, by in spoken.items()}
    assert where == {"audio_encoder": {1}, "vision_encoder": {1}, "Thinker": {1},
                     "Talker": {0}, "Code2Wav": {0}}, where
    client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    text_only = ran()
    assert text_only["Talker"] == spoken["Talker"] and text_only["Code2Wav"] == spoken["Code2Wav"]
    assert sum(text_only["Thinker"].values()) > sum(spoken["Thinker"].values())


def mp4(seconds: float) -> str:
    """A data URL of an MP4 of `seconds` at 10 fps."""
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * 10)):
            frame = np.full((32, 32, 3), 8 * i % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return "data:video/mp4;base64," + base64.b64encode(out.getvalue()).decode()


def test_audio_that_is_not_audio_and_a_video_too_long_are_refused(client):
    noise = base64.b64encode(b"not a sound at all" * 20).decode()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": noise, "format": "wav"}},
            {"type": "text", "text": "hi"}]}], **GREEDY)
    assert info.value.body["param"] == "messages[0].content[0]", info.value.body
    short = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": mp4(1)}},
                                          {"type": "text", "text": "what happens?"}]}]
    assert client.chat.completions.create(model=MODEL, messages=short, **GREEDY).choices
    long = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": mp4(4)}},
                                         {"type": "text", "text": "what happens?"}]}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=long, **GREEDY)
    assert info.value.status_code in (400, 413) and "2" in info.value.body["message"], \
        info.value.body
