"""Audio at the contract's edges, without a deployment: what reaches the model of a chat
asking for a spoken reply (`native_fields`: `modalities` and `voice`, nothing for a text
chat), the answer's shape (`chat_response` with `chat_audio`: content null, as OpenAI
answers), `Model`'s default for transcriptions (a 400 naming `model`), and a chat's audio
parts decoded at the model's `audio_input_rate()`. The routes themselves are tested
served, in `tests/e2e/test_openai_audio.py`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from mstar import events
from mstar.api_server import openai_protocol as oai
from mstar.chat import build_chat_prompt
from mstar.errors import RequestError
from mstar.media import Audio, MediaLimits
from mstar.model import Model

HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> oai.ChatCompletionRequest:
    req = oai.parse(oai.ChatCompletionRequest, {"model": "m", "messages": HI, **fields})
    oai.check_chat(req)
    return req


def test_a_spoken_reply_reaches_the_model_as_modalities_and_voice():
    spoken = chat(modalities=["text", "audio"], audio={"voice": "echo", "format": "wav"})
    fields = oai.native_fields(spoken, default_max_tokens=8)
    assert fields["modalities"] == ["text", "audio"] and fields["voice"] == "echo"
    streamed = chat(modalities=["text", "audio"], audio={"format": "pcm16"}, stream=True)
    fields = oai.native_fields(streamed, default_max_tokens=8)
    assert fields["modalities"] == ["text", "audio"] and "voice" not in fields
    for text in (chat(), chat(modalities=["text"])):
        assert not {"modalities", "voice"} & oai.native_fields(text, default_max_tokens=8).keys()


def test_a_spoken_answer_has_null_content_and_the_audio():
    choices = oai.Choices(1)
    choices.add(events.TextDelta("hi", [104, 105]))
    chunk = events.AudioChunk(events.TensorData("float32", [2], b"\0" * 8), 16000)
    choices.add(chunk)
    assert choices.text == ["hi"] and choices.audio == [[chunk]]
    audio = oai.chat_audio("r1", 0, data=b"\x01\x02", transcript="hi", expires_at=7,
                           sample_rate=16000)
    body = oai.chat_response("r1", "m", 7, choices, events.Finished("stop", events.Usage(3, 2)),
                             False, [audio])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None, "audio": {
        "id": "audio_r1_0", "data": "AQI=", "transcript": "hi", "expires_at": 7,
        "sample_rate": 16000}}
    plain = oai.chat_response("r1", "m", 7, choices, events.Finished("stop"), False)
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert oai.chat_audio("r1", 2, transcript="h") == {"id": "audio_r1_2", "transcript": "h"}


def test_a_model_transcribes_only_when_it_implements_the_hook():
    model = Model(None)
    assert model.audio_input_rate() is None  # the file's own rate
    with pytest.raises(RequestError) as info:
        model.process_transcription(Audio(np.zeros(4, dtype=np.float32), 16000), {})
    assert info.value.code == 400 and info.value.param == "model"


def test_a_chats_audio_is_decoded_at_the_models_input_rate():
    from mstar_testvla.model import TestVLA

    model = TestVLA(TestVLA.make_config(preset="tiny"))
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(800, dtype=np.float32), 8000, format="WAV")
    messages = [{"role": "user", "content": [{"type": "audio", "blob": 0}]}]
    prompt = build_chat_prompt(model, messages, [buf.getvalue()], MediaLimits())
    (audio,) = prompt.audios
    assert model.audio_input_rate() == audio.sample_rate == 16000
    assert len(audio.samples) == 1600
