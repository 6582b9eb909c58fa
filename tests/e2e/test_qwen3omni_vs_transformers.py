"""The whole Qwen3-Omni pipeline against transformers: a seeded tiny checkpoint in the hub
layout (`mstar_qwen3omni.checkpoint`) served by `mstar.load` in two layouts gives, greedy,
the same text as `Qwen3OmniMoeForConditionalGeneration.generate` and the same waveform as
its `chunked_decode(codes, 300, 25)` (our Code2Wav windows set to the same boundaries:
`codec_chunk_frames=codec_first_chunk_frames=300`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tokens

import mstar
from mstar import events

REQUEST = {"prompt": "Hello", "max_tokens": 5, "modalities": ["text", "audio"],
           "temperature": 0, "talker_temperature": 0, "talker_max_tokens": 40, "seed": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mstar_qwen3omni.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen3omni-tiny"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(prompt ids, transformers' generated ids, its waveform) for `REQUEST`."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeForConditionalGeneration,
    )

    from mstar_qwen3omni.model import Qwen3Omni

    model = Qwen3Omni(Qwen3Omni.make_config(preset="tiny"))
    model.use_checkpoint_files({"default": checkpoint})
    ids = model.process_prompt(REQUEST).first_walks["thinker"].inputs["prompt"][0]
    hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(checkpoint),
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        seq, wav = hf.generate(ids[None], speaker="ethan", thinker_max_new_tokens=5,
                               thinker_do_sample=False, talker_do_sample=False,
                               talker_max_new_tokens=40, return_audio=True)
    return seq[0, len(ids):].tolist(), wav.reshape(-1)


@pytest.mark.parametrize("layout", ["qwen3omni_colocated", "qwen3omni_2gpu"])
def test_text_and_speech_equal_transformers(checkpoint, reference, layout):
    text, wav = reference
    with mstar.load("qwen3_omni", layout, model_path=str(checkpoint), max_seq_len=1024,
                    kv_cache={"num_pages": 128},
                    model_kwargs={"codec_chunk_frames": 300,
                                  "codec_first_chunk_frames": 300}) as d:
        evs = list(d.generate(REQUEST))
    assert isinstance(evs[-1], events.Finished), evs[-1]
    assert tokens(evs) == text
    ours = torch.cat([e.samples.to_tensor() for e in evs if isinstance(e, events.AudioChunk)])
    assert ours.shape == wav.shape and float(wav.pow(2).mean().sqrt()) > 0.01  # audible
    torch.testing.assert_close(ours, wav.float(), rtol=1e-4, atol=1e-5)
