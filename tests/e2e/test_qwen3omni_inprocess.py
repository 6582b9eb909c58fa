"""Qwen3-Omni end to end in process (`mstar.load`, tiny preset, dummy weights): text-only
requests run the Thinker alone; a spoken reply streams audible 24 kHz audio and is the same
text and audio for a seed in every packaged layout (co-located, 2 ranks, prefill/decode
split); image, audio and video inputs; bad input names its field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import collect, settle, tokens
from PIL import Image

import mstar
from mstar import events
from mstar.errors import RequestError
from mstar.media import Audio, Video

LAYOUTS = ("qwen3omni_colocated", "qwen3omni_2gpu", "qwen3omni_pd_disaggregated")
SPEAK = {"prompt": "Hello there", "max_tokens": 6, "modalities": ["text", "audio"],
         "seed": 7}


@pytest.fixture(scope="module")
def deployments():
    loaded = {name: mstar.load("qwen3_omni", name, preset="tiny", load_format="dummy",
                               max_seq_len=1024, kv_cache={"num_pages": 128})
              for name in LAYOUTS}
    yield loaded
    for d in loaded.values():
        d.close()


def audio_of(evs: list[events.Event]) -> torch.Tensor:
    chunks = [e for e in evs if isinstance(e, events.AudioChunk)]
    assert all(c.sample_rate == 24000 for c in chunks)
    return torch.cat([c.samples.to_tensor() for c in chunks]) if chunks else torch.zeros(0)


def test_text_only_runs_the_thinker_alone(deployments):
    evs = collect(deployments["qwen3omni_colocated"], {"prompt": "Hi", "max_tokens": 4})
    assert isinstance(evs[-1], events.Finished) and evs[-1].usage.completion_tokens == 4
    assert len(tokens(evs)) == 4 and audio_of(evs).numel() == 0


def test_spoken_reply_is_audible_and_the_same_in_every_layout(deployments):
    runs = {name: collect(d, SPEAK) for name, d in deployments.items()}
    first = runs[LAYOUTS[0]]
    assert isinstance(first[-1], events.Finished), first[-1]
    wave = audio_of(first)
    # whole frames of 1920 samples, less Code2Wav's 555 per window (the first of 10
    # frames, then chunks of 25), at most the Talker's bound: 8 frames a token of
    # max_tokens, at least 64 (the dummy Talker stops at its end code, or there)
    def samples(frames: int) -> int:
        return frames * 1920 - 555 * (1 + -(-max(frames - 10, 0) // 25))

    assert any(samples(f) == wave.numel() for f in range(11, 65)), wave.numel()
    assert 0.01 < float(wave.pow(2).mean().sqrt()) < 0.9 and float(wave.std()) > 0.01
    for name, evs in runs.items():
        assert tokens(evs) == tokens(first), name
        assert torch.equal(audio_of(evs), wave), name


def test_image_audio_and_video_in(deployments):
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(40, 72, 3) * 255).astype("uint8"))
    clip = Audio((0.3 * np.sin(np.arange(20000) * 2 * np.pi * 440 / 16000)).astype("float32"),
                 16000)
    video = Video((rng.rand(4, 64, 64, 3) * 255).astype("uint8"), 2.0, [0, 0.5, 1, 1.5])
    request = {"prompt": "What is in these?", "image": image, "audio": clip, "video": video,
               "max_tokens": 3, "seed": 1}
    evs = collect(deployments["qwen3omni_pd_disaggregated"], request)
    assert isinstance(evs[-1], events.Finished), evs[-1]
    assert evs[-1].usage.prompt_tokens > 40 and len(tokens(evs)) == 3
    again = collect(deployments["qwen3omni_colocated"], request)
    assert tokens(again) == tokens(evs)


def test_unknown_voice_names_it(deployments):
    with pytest.raises(RequestError) as info:
        deployments["qwen3omni_colocated"].generate({**SPEAK, "voice": "Nobody"})
    assert info.value.param == "voice" and "Ethan" in str(info.value)


def test_prompt_past_max_seq_len_says_what_the_media_took():
    clip = Audio(np.zeros(16000 * 20, dtype="float32"), 16000)  # 20 s: 260 audio rows
    with mstar.load("qwen3_omni", "qwen3omni_colocated", preset="tiny", load_format="dummy",
                    max_seq_len=128, kv_cache={"num_pages": 32}) as d:
        with pytest.raises(RequestError) as info:
            d.generate({"prompt": "Hi", "audio": clip})
    assert info.value.param == "prompt"
    assert "of them media (audio 260)" in str(info.value), str(info.value)


def _clip(seconds: float, sound: bool) -> bytes:
    """An MP4 of `seconds` at 10 fps of changing gray frames, with a 440 Hz AAC track."""
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=10)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        track = container.add_stream("aac", rate=16000, layout="mono") if sound else None
        for i in range(int(seconds * 10)):
            frame = np.full((64, 64, 3), 10 + 10 * i, dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if track is not None:
            t = np.arange(int(seconds * 16000)) / 16000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for packet in [*track.encode(frame), *track.encode()]:
                container.mux(packet)
    return buffer.getvalue()


def test_video_with_its_audio(deployments):
    """`use_audio_in_video`: the clip's frames and sound enter as one interleaved item
    (more prompt rows than the frames alone); a clip without sound is a 400."""
    d = deployments["qwen3omni_colocated"]
    request = {"prompt": "What happens?", "video": _clip(2.0, sound=True), "max_tokens": 2,
               "seed": 2}
    alone = collect(d, request)
    both = collect(d, {**request, "use_audio_in_video": True})
    assert isinstance(both[-1], events.Finished), both[-1]
    assert both[-1].usage.prompt_tokens > alone[-1].usage.prompt_tokens + 20
    with pytest.raises(RequestError) as info:
        d.generate({**request, "video": _clip(2.0, sound=False), "use_audio_in_video": True})
    assert info.value.param == "use_audio_in_video"


def test_a_client_leaving_mid_speech_frees_every_partition(deployments):
    """Closing the stream after the first audio packet cancels the request: the Thinker,
    Talker and Code2Wav stop and every page and tensor is released, in each layout."""
    for name, d in deployments.items():
        stream = d.generate({**SPEAK, "max_tokens": 40})
        for event in stream:
            if isinstance(event, events.AudioChunk):
                break
        else:
            pytest.fail(f"{name}: no audio before the end")
        assert d.pages_in_use() > 0, name  # the Talker was still speaking
        stream.close()
        settle(d)


def test_a_thinker_that_stops_at_its_first_token_still_ends_the_speech(deployments):
    """`max_tokens` 1: the Thinker feeds no generated row, so the Talker's first window is
    the prompt's rows alone; it is told the text ended (`tts_eos`) and the request finishes
    (transformers' `generate` fails on this case)."""
    for name, d in deployments.items():
        evs = collect(d, {**SPEAK, "max_tokens": 1})
        assert isinstance(evs[-1], events.Finished), (name, evs[-1])
        assert len(tokens(evs)) == 1, name
