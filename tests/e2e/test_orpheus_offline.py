"""The offline first run: `--preset tiny --load-format dummy` Orpheus speaks, with nothing
downloaded. Its dummy weights go through `Orpheus.adjust_dummy_weight`, so every token the
random LM samples is an audio code of its frame position and the random codec is audible;
and the tiny preset caps the packaged YAML's real context (131072 tokens) at its own,
unless `max_seq_len` is given explicitly."""

from __future__ import annotations

import pytest
import torch
import yaml

import mstar
from mstar import events
from mstar.cli.main import main
from mstar_orpheus.config import PRESET_MAX_SEQ_LEN, SAMPLES_PER_FRAME

pytestmark = pytest.mark.timeout(120)

FRAMES = 12
DUMMY = ["serve", "orpheus", "--preset", "tiny", "--load-format", "dummy", "--validate-config"]


@pytest.fixture(scope="module")
def dummy():
    dep = mstar.load("orpheus", preset="tiny", load_format="dummy")
    yield dep
    dep.close()


def test_a_tiny_dummy_orpheus_speaks_the_default_request(dummy):
    # the default request of /v1/audio/speech, cut to FRAMES frames of 7 tokens
    evs = list(dummy.generate({"input": "Hello there", "voice": "tara",
                               "max_tokens": 7 * FRAMES, "seed": 5}))
    assert isinstance(evs[-1], events.Finished) and evs[-1].reason == "length", evs[-1]
    audio = torch.cat([e.samples.to_tensor() for e in evs if isinstance(e, events.AudioChunk)])
    # every sampled token made a code of its frame position: FRAMES whole frames
    assert audio.numel() == FRAMES * SAMPLES_PER_FRAME
    frames = audio.reshape(FRAMES, SAMPLES_PER_FRAME)
    assert bool((frames.std(dim=1) > 0.01).all()), frames.std(dim=1)  # audible throughout
    assert audio.abs().max() < 1.0


def test_the_tiny_preset_caps_the_yaml_context_unless_given(dummy, capsys):
    assert dummy.config.max_seq_len == PRESET_MAX_SEQ_LEN["tiny"] < 131072
    assert main(DUMMY) == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_seq_len"] == PRESET_MAX_SEQ_LEN["tiny"]
    assert main([*DUMMY, "--set", "max_seq_len=9000"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_seq_len"] == 9000
