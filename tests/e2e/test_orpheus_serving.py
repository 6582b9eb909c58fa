"""Orpheus through real `mstar-serve` processes in each packaged layout (co-located,
prefill/decode on two ranks, the codec on its own rank, the LM tensor-parallel over two
ranks): the same seeded request gives the same audio as in one process, 2048 samples per
frame, a greedy one the same tokens and log-probs (within 1e-4: they are log-softmax of the
LM's logits), and the first audio arrives while the LM is still generating. The checkpoint is tiny and made to speak
(`make_it_speak`: every sampled token is an audio code), so the codec really decodes."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import openai
import pytest
import soundfile
from placement_check import check_placement
from serving_harness import Server, running

import mstar
from mstar import events
from mstar_orpheus.checkpoint import make_it_speak, write_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)

FRAMES = 12
REQUEST = {"input": "hello there", "voice": "zoe", "max_tokens": 7 * FRAMES,
           "ignore_eos": True, "seed": 11}
#: Greedy, with the LM's tokens and log-probs (`logprobs` makes them text deltas).
GREEDY = {"input": "hello there", "voice": "tara", "max_tokens": 16, "ignore_eos": True,
          "temperature": 0, "logprobs": 2}


@pytest.fixture(scope="module")
def speaking_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("orpheus-serving") / "ckpt"
    write_tiny_checkpoint(path, preset="tiny", seed=2, tie_word_embeddings=False)
    make_it_speak(path, seed=2)
    return path


@dataclass(frozen=True)
class Reference:
    """The in-process co-located run: its audio, the greedy request's tokens and
    log-probs, and each node's (all, tensor-parallel split) parameter bytes built whole on
    one rank."""

    audio: np.ndarray
    greedy: tuple[list[int], np.ndarray]
    parameter_bytes: dict[str, tuple[int, int]]


@pytest.fixture(scope="module")
def expected(speaking_ckpt) -> Reference:
    dep = mstar.load("orpheus", model_path=str(speaking_ckpt), max_seq_len=1024)
    try:
        evs = list(dep.generate(REQUEST))
        deltas = [e for e in dep.generate(GREEDY) if isinstance(e, events.TextDelta)]
        held = dict(dep.workers[0].parameter_bytes)
    finally:
        dep.close()
    audio = [e.samples.to_tensor().numpy() for e in evs if isinstance(e, events.AudioChunk)]
    greedy = ([t for e in deltas for t in e.token_ids],
              np.array([[lp.logprob, *(v for _, v in lp.top)] for e in deltas
                        for lp in e.logprobs]))
    return Reference(np.concatenate(audio), greedy, held)


def served_audio(body: dict) -> tuple[np.ndarray, int]:
    chunks = [e for e in body["events"] if e["event"] == "audio_chunk"]
    audio = [np.frombuffer(base64.b64decode(e["samples"]["data"]), dtype=np.float32)
             for e in chunks]
    return np.concatenate(audio), len(chunks)


def served_greedy(server: Server) -> tuple[list[int], np.ndarray]:
    """The greedy request's tokens, and each one's log-prob and its top 2 log-probs."""
    response = server.generate(GREEDY)
    assert response.status_code == 200, response.text
    deltas = [e for e in response.json()["events"] if e["event"] == "text_delta"]
    return ([t for e in deltas for t in e["token_ids"]],
            np.array([[lp["logprob"], *(v for _, v in lp["top"])] for e in deltas
                      for lp in e["logprobs"]]))


def check_layout(server: Server, config: str, expected: Reference) -> None:
    """The same audio, greedy tokens and log-probs, with each rank running and holding
    what the YAML places on it: no prefill on the decode rank (its K/V arrives), the codec
    only on its rank, the LM's steps on both ranks of its TP group with half its weights
    on each."""
    response = server.generate(REQUEST)
    assert response.status_code == 200, response.text
    audio, chunks = served_audio(response.json())
    assert audio.size == FRAMES * 2048 and chunks == FRAMES - 1  # frames 0-1 together
    np.testing.assert_allclose(audio, expected.audio, atol=1e-5)
    tokens, logprobs = served_greedy(server)
    assert len(tokens) == GREEDY["max_tokens"] and tokens == expected.greedy[0]
    np.testing.assert_allclose(logprobs, expected.greedy[1], rtol=0, atol=1e-4)
    check_placement(server, config, prefill_walks={"prefill"},
                    single_rank_bytes=expected.parameter_bytes)
    server.wait_idle()


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, speaking_ckpt):
    with running(tmp_path_factory.mktemp("orpheus-colocated"), "--config",
                 "orpheus_colocated", "--model-path", str(speaking_ckpt),
                 "--set", "max_seq_len=1024") as server:
        yield server


def test_the_colocated_layout_speaks_the_in_process_audio(colocated, expected):
    check_layout(colocated, "orpheus_colocated", expected)


@pytest.mark.parametrize("config", ["orpheus_pd_disaggregated", "orpheus_codec_split",
                                    "orpheus_tp2"])
def test_every_split_layout_speaks_the_same_audio(tmp_path, speaking_ckpt, expected, config):
    server = Server(tmp_path, "--config", config, "--model-path", str(speaking_ckpt),
                    "--set", "max_seq_len=1024")
    try:
        server.wait_healthy()
        check_layout(server, config, expected)
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_openai_speech_decodes_to_24khz_audio_of_every_frame(colocated, expected, fmt):
    """`audio.speech.create`, whole and with_streaming_response, read with soundfile:
    24 kHz and the utterance's length (mp3/opus resampled or primed: within a frame)."""
    client = openai.OpenAI(base_url=colocated.url + "/v1", api_key="none", max_retries=0)
    kwargs = dict(model="orpheus", input=REQUEST["input"], voice="zoe", response_format=fmt,
                  extra_body={"max_tokens": REQUEST["max_tokens"], "ignore_eos": True,
                              "seed": REQUEST["seed"]})
    whole = client.audio.speech.create(**kwargs).content
    with client.audio.speech.with_streaming_response.create(**kwargs) as response:
        pieces = list(response.iter_bytes())
    assert b"".join(pieces) == whole or fmt in ("mp3", "opus")
    audio, rate = soundfile.read(io.BytesIO(whole), dtype="float32")
    assert rate == 24000
    want = expected.audio.size * rate // 24000
    if fmt in ("wav", "flac"):
        assert audio.shape[0] == want
        np.testing.assert_allclose(audio, expected.audio, atol=1e-3)  # 16-bit samples
    else:
        assert abs(audio.shape[0] - want) <= 2048 * rate // 24000


def test_an_unknown_voice_is_a_400_listing_the_voices(colocated):
    client = openai.OpenAI(base_url=colocated.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="voices: tara, leah, jess, leo, dan") as info:
        client.audio.speech.create(model="orpheus", input="hi", voice="nova")
    assert info.value.param == "voice"


def test_speech_errors_name_their_field_and_are_no_server_errors(colocated):
    """Too long a text names `input` (not the prompt the model built from it); too few
    tokens for one frame end the request without audio: a 400 naming max_tokens, counted
    as an error; a chat on this speech-only model names its capabilities."""
    client = openai.OpenAI(base_url=colocated.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="orpheus", input="word " * 2000, voice="tara",
                                   extra_body={"max_tokens": 70})
    assert info.value.param == "input" and "max_seq_len" in info.value.message
    errors = colocated.metric('mstar_requests_total{status="error"}')
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="orpheus", input="hi", voice="tara",
                                   extra_body={"max_tokens": 3, "ignore_eos": True})
    assert info.value.param == "max_tokens" and "without any audio" in info.value.message
    assert colocated.metric('mstar_requests_total{status="error"}') == errors + 1
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="orpheus", messages=[{"role": "user",
                                                                   "content": "hi"}])
    assert info.value.param == "model" and "its capabilities: generate, speech" in info.value.message
    colocated.wait_idle()
