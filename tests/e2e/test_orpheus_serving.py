"""Orpheus through real `mstar-serve` processes in each packaged layout (co-located,
prefill/decode on two ranks, the codec on its own rank): the same seeded request gives
the same audio as in one process, 2048 samples per frame, and the first audio arrives
while the LM is still generating. The checkpoint is tiny and made to speak
(`make_it_speak`: every sampled token is an audio code), so the codec really decodes."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from serving_harness import Server

import mstar
from mstar import events
from mstar_orpheus.checkpoint import make_it_speak, write_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)

FRAMES = 12
REQUEST = {"input": "hello there", "voice": "zoe", "max_tokens": 7 * FRAMES,
           "ignore_eos": True, "seed": 11}


@pytest.fixture(scope="module")
def speaking_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("orpheus-serving") / "ckpt"
    write_tiny_checkpoint(path, preset="tiny", seed=2, tie_word_embeddings=False)
    make_it_speak(path, seed=2)
    return path


@pytest.fixture(scope="module")
def expected(speaking_ckpt) -> np.ndarray:
    dep = mstar.load("orpheus", model_path=str(speaking_ckpt), max_seq_len=1024)
    try:
        evs = list(dep.generate(REQUEST))
    finally:
        dep.close()
    audio = [e.samples.to_tensor().numpy() for e in evs if isinstance(e, events.AudioChunk)]
    return np.concatenate(audio)


def served_audio(body: dict) -> tuple[np.ndarray, int]:
    chunks = [e for e in body["events"] if e["event"] == "audio_chunk"]
    audio = [np.frombuffer(base64.b64decode(e["samples"]["data"]), dtype=np.float32)
             for e in chunks]
    return np.concatenate(audio), len(chunks)


@pytest.mark.parametrize("config", ["orpheus_colocated", "orpheus_pd_disaggregated",
                                    "orpheus_codec_split"])
def test_every_layout_speaks_the_same_audio(tmp_path, speaking_ckpt, expected, config):
    server = Server(tmp_path, "--config", config, "--model-path", str(speaking_ckpt),
                    "--set", "max_seq_len=1024")
    try:
        server.wait_healthy()
        response = server.generate(REQUEST)
        assert response.status_code == 200, response.text
        audio, chunks = served_audio(response.json())
        assert audio.size == FRAMES * 2048 and chunks == FRAMES - 1  # frames 0-1 together
        np.testing.assert_allclose(audio, expected, atol=1e-5)
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()
