"""Qwen3-Omni with its Thinker tensor-parallel over two ranks (`qwen3omni_thinker_tp2`, and
a layout sharding the Talker too), served as real processes on a seeded tiny checkpoint
(`mstar_qwen3omni.checkpoint`, loaded by the real loader: each rank reads its half of the
heads and of every expert): a greedy spoken reply gives the single-rank deployment's
tokens, log-probs within 1e-4 (log-softmax of the Thinker's logits) and audio (the Talker
reads the Thinker's hidden rows and samples its codes inside the node), both ranks ran
every step of a TP node while only rank 0 ran the rest, and a text request asked again
reuses the Thinker's cached prompt pages on both ranks."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
from placement_check import by_rank, check_placement
from serving_harness import running

import mstar
from mstar import events

pytestmark = pytest.mark.timeout(240)

#: The packaged layout, and one that also shards the Talker, whose code predictor samples
#: inside the node (`ctx.sample`): the followers must take the leader's draws.
LAYOUTS = {"qwen3omni_thinker_tp2": "qwen3omni_thinker_tp2", "talker_tp2_too": """
model: qwen3_omni
max_seq_len: 32768
node_groups:
  - {node_names: [audio_encoder, vision_encoder, Code2Wav], ranks: [0]}
  - {node_names: [Thinker], ranks: [0, 1], tp_size: 2}
  - {node_names: [Talker], ranks: [0, 1], tp_size: 2}
"""}
#: A short spoken reply (the Talker stops after 12 codec frames).
SPEAK = {"prompt": "Hello there", "max_tokens": 6, "modalities": ["text", "audio"],
         "temperature": 0, "logprobs": 2, "seed": 7, "talker_max_tokens": 12}
#: A text reply, asked twice: the second time the Thinker's prompt pages come from the
#: prefix cache (a spoken reply streams every prompt row to the Talker, so it reuses none).
TEXT = {"prompt": "Hello there, how are you?", "max_tokens": 4, "temperature": 0,
        "logprobs": 2}
#: The walks the two take; the Thinker's prompt is computed in their first.
WALKS = {"prefill_last_speech", "decode_speech", "talker", "code2wav", "prefill_last",
         "decode"}
OPTIONS = {"max_seq_len": 1024, "kv_cache": {"num_pages": 128}}


def summary(evs: list) -> dict:
    """Tokens, each one's log-prob and its top 2, and the audio of a request's events."""
    deltas = [e for e in evs if isinstance(e, events.TextDelta)]
    audio = [e.samples.to_tensor().numpy() for e in evs if isinstance(e, events.AudioChunk)]
    return {"tokens": [t for e in deltas for t in e.token_ids],
            "logprobs": np.array([[lp.logprob, *(v for _, v in lp.top)] for e in deltas
                                  for lp in e.logprobs]),
            "audio": np.concatenate(audio) if audio else np.zeros(0, np.float32)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mstar_qwen3omni.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen3omni-tp") / "tiny", seed=3)


@pytest.fixture(scope="module")
def single_rank(ckpt) -> tuple[dict[str, dict], dict[str, tuple[int, int]]]:
    """SPEAK and TEXT on one rank (in process), and each node's (all, split) parameter
    bytes."""
    with mstar.load("qwen3_omni", "qwen3omni_colocated", model_path=str(ckpt),
                    **OPTIONS) as deployment:
        return ({"speak": summary(list(deployment.generate(SPEAK))),
                 "text": summary(list(deployment.generate(TEXT)))},
                dict(deployment.workers[0].parameter_bytes))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request, tmp_path_factory, ckpt):
    """(the served layout, its config: a packaged name or a YAML file)."""
    tmp = tmp_path_factory.mktemp("qwen3omni-tp-server")
    config = LAYOUTS[request.param]
    if "\n" in config:
        (tmp / "layout.yaml").write_text(config)
        config = str(tmp / "layout.yaml")
    with running(tmp, "--config", config, "--model-path", str(ckpt), "--set",
                 "max_seq_len=1024", "--set", "kv_cache.num_pages=128") as srv:
        yield srv, config


def test_tp_layout_speaks_and_writes_as_one_rank(server, single_rank):
    """The spoken reply, then the text one twice: the second time the Thinker reuses its
    cached prompt pages, on the follower as on the leader."""
    server, config = server
    want, parameter_bytes = single_rank
    assert len(want["speak"]["tokens"]) == SPEAK["max_tokens"]
    assert want["speak"]["audio"].size > 0
    for name, body in (("speak", SPEAK), ("text", TEXT), ("text", TEXT)):
        response = server.generate(body)
        assert response.status_code == 200, response.text
        got = summary([msgspec.json.decode(json.dumps(e), type=events.Event)
                       for e in response.json()["events"]])
        assert got["tokens"] == want[name]["tokens"], name
        np.testing.assert_allclose(got["logprobs"], want[name]["logprobs"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["audio"], want[name]["audio"], rtol=0, atol=1e-4)
    check_placement(server, config, prefill_walks={"prefill_last_speech", "prefill_last",
                                                   "talker"},
                    single_rank_bytes=parameter_bytes, walks=WALKS)
    # the follower replayed every one of the leader's steps of a TP node, no more
    steps = by_rank(server, "mstar_node_invocations_total", "node", "walk")
    for node in ("Thinker", "Talker"):
        ranks = {r for r, n, _ in steps if n == node}
        for walk in {w for _, n, w in steps if n == node}:
            counts = {steps.get((r, node, walk), 0) for r in ranks}
            assert len(counts) == 1 and counts != {0}, (node, walk, steps)
    hits = by_rank(server, "mstar_prefix_cache_hit_tokens_total", "node")
    assert hits[(0, "Thinker")] == hits[(1, "Thinker")] > 0, hits
    server.wait_idle()

