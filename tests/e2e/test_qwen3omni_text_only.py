"""Qwen3-Omni that cannot speak (`enable_audio_output: false`, the packaged
`qwen3omni_text_only`): in process it declares no Talker or Code2Wav, answers text and
refuses a spoken reply naming `modalities`; a thinker-only checkpoint (no Talker or Code2Wav
weights, the flag in its config.json) loads and writes transformers' greedy text, as the
full checkpoint does under the text-only config; served, `/v1/models` leaves
`audio_output` out, a chat asking for audio is a 400 naming `modalities` (the SDK refuses
it before sending) and `/generate`'s is the model's 400."""

from __future__ import annotations

import openai
import pytest
import torch
from conftest import collect, tokens
from safetensors import safe_open
from serving_harness import running

import mstar
from mstar import MStarClient, events
from mstar.client import UnsupportedCapabilityError
from mstar.errors import RequestError

pytestmark = pytest.mark.timeout(120)

MODEL = "qwen3_omni"
SPOKEN = {"prompt": "Hi", "max_tokens": 4, "modalities": ["text", "audio"]}
THINKER_ONLY = {"audio_encoder", "vision_encoder", "Thinker"}


def test_in_process_it_writes_text_and_refuses_to_speak():
    with mstar.load(MODEL, "qwen3omni_text_only", preset="tiny", load_format="dummy",
                    max_seq_len=512, kv_cache={"num_pages": 32}) as d:
        assert set(d.model.node_engine_types()) == THINKER_ONLY
        assert [p.name for p in d.model.partitions()] == ["thinker"]
        assert not d.model.streaming_edges() and "talker" not in d.model.graph_walks()
        assert d.model.unavailable_capabilities() == {"audio_output"}
        evs = collect(d, {"prompt": "Hi", "max_tokens": 4, "seed": 0})
        assert isinstance(evs[-1], events.Finished) and len(tokens(evs)) == 4
        with pytest.raises(RequestError) as info:
            d.generate(SPOKEN)
        assert info.value.param == "modalities" and "cannot speak" in str(info.value)


def test_a_thinker_only_checkpoint_loads_and_writes_transformers_text(tmp_path):
    """A checkpoint without Talker or Code2Wav weights, its config.json saying so, writes
    transformers' greedy text; the full checkpoint under `qwen3omni_text_only` writes the
    same (its Talker's and Code2Wav's weights left unread)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeForConditionalGeneration,
    )

    from mstar_qwen3omni.checkpoint import write_checkpoint

    path = write_checkpoint(tmp_path / "thinking", enable_audio_output=False)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {key.split(".")[0] for key in f.keys()} == {"thinker"}
    request = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "seed": 0}
    # no model_kwargs: the flag comes from the config.json
    layout = {"node_groups": [{"node_names": sorted(THINKER_ONLY), "ranks": [0]}]}
    with mstar.load(MODEL, layout, model_path=str(path), max_seq_len=512,
                    kv_cache={"num_pages": 32}) as d:
        assert set(d.model.node_engine_types()) == THINKER_ONLY
        ids = d.model.process_prompt(request).first_walks["thinker"].inputs["prompt"][0]
        ours = tokens(collect(d, request))
    full = write_checkpoint(tmp_path / "instruct")
    with mstar.load(MODEL, "qwen3omni_text_only", model_path=str(full), max_seq_len=512,
                    kv_cache={"num_pages": 32}) as d:
        assert tokens(collect(d, request)) == ours
    hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(path),
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        seq = hf.generate(ids[None], thinker_max_new_tokens=5, thinker_do_sample=False)
    assert ours == seq[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("qwen3omni-text"), "--config", "qwen3omni_text_only",
                 "--preset", "tiny", "--load-format", "dummy",
                 "--set", "max_seq_len=512") as srv:
        yield srv


def test_served_it_lists_no_audio_output_and_refuses_a_spoken_chat(server):
    listed = server.client.get("/v1/models").json()["data"][0]["capabilities"]
    assert "chat" in listed and "audio_input" in listed and "audio_output" not in listed
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                            temperature=0)
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                       modalities=["text", "audio"],
                                       audio={"voice": "ethan", "format": "wav"})
    error = info.value.body
    assert error["param"] == "modalities" and error["code"] == "unsupported_capability"
    assert "'audio_output'" in error["message"], error
    with pytest.raises(UnsupportedCapabilityError) as refused:  # the SDK reads /v1/models: never sent
        MStarClient(server.url).chat("Hi", audio_out=True)
    assert "'audio_output'" in str(refused.value)
    generated = server.client.post("/generate", json=SPOKEN)
    assert generated.status_code == 400, generated.text
    assert generated.json()["error"]["param"] == "modalities"
