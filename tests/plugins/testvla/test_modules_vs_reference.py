"""TestVLA's node modules, loaded from the checkpoint files through `mstar.weights`, against
the plain-torch reference (`reference.py`) on the same files.

Each test drives the modules as the runtime would, with hand-built `ForwardBatch`es over a
real KV cache; per-invocation inputs come from the model's own walks (`prepare` rules and
the names each GraphNode lists), so the host-side layout is checked too. The last section
checks the host-side functions (request validation, walk transitions, postprocess) and
that the plugin is found through its entry point.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from mstar.chat import IncrementalDetokenizer
from mstar.engine import rng
from mstar.events import AudioChunk, NamedTensor, TextDelta
from mstar.graph import GraphNode, walk_nodes
from mstar.model.contract import Done, Fork, OutputState, RequestState, WalkStep
from mstar.model.forward import SeqKey
from mstar.plugins import model_registry
from mstar.runtime.chunker import StreamChunker, slice_emitted
from mstar_testvla.checkpoint import write_tiny_checkpoint
from mstar_testvla.model import STREAM_POLICY, TestVLA
from mstar_testvla.tokenizer import ACT, FRAME, IMG, ByteTokenizer
from testvla import Chunk, KeyedNoise, load_model, load_node, new_cache, run_llm
from testvla.reference import Reference

ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("testvla"), "tiny", seed=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def ref(checkpoint):
    return Reference(checkpoint)


@pytest.fixture(scope="module")
def llm(model, checkpoint):
    return load_node(model, "LLM", checkpoint)


@pytest.fixture(scope="module")
def vision(model, checkpoint):
    return load_node(model, "vision_encoder", checkpoint)


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


def walk_node(model: TestVLA, walk: str, name: str) -> GraphNode:
    return next(n for n in walk_nodes(model.graph_walks()[walk].body) if n.name == name)


def invoke(node: GraphNode, env: dict[str, Any], iteration: int | None = None
           ) -> dict[str, Any]:
    """What the runtime hands a node: its prepare rule merged into the environment, then
    the names the node lists as inputs."""
    if node.prepare is not None:
        env.update(node.prepare(env, iteration))
    return {name: env[name] for name in node.inputs if name in env}


def encode(model, vision, plan) -> dict[str, Any]:
    """The request's environment after the encode walk (the params plus image features)."""
    env = dict(plan.params)
    walk = plan.first_walks["lm"]
    if walk.walk == "encode":
        with torch.no_grad():
            env["image_features"] = vision([walk.inputs], None)[0]["image_features"]
    return env


# -- vision ----------------------------------------------------------------------------------


def test_vision_encoder_ragged_batch(vision, ref):
    torch.manual_seed(0)
    images = [image(8, 12, 1), image(4, 4, 2), image(12, 8, 3)]
    with torch.no_grad():
        together = vision([{"pixel_values": im} for im in images], None)
        alone = vision([{"pixel_values": images[0]}], None)[0]["image_features"]
    for im, out in zip(images, together):
        feats = out["image_features"]
        assert feats.shape == (im.shape[1] * im.shape[2] // 16, 32)
        torch.testing.assert_close(feats, ref.vision(im), atol=ATOL, rtol=0)
    # Each image is its own segment: batching with others changes nothing.
    torch.testing.assert_close(together[0]["image_features"], alone, atol=1e-6, rtol=0)


# -- prefill with expert routing -------------------------------------------------------------


def test_prefill_text_image_text_routes_experts(model, llm, vision, ref):
    torch.manual_seed(0)
    img = image(8, 12, 4)
    mixed = model.process_prompt({"prompt": "ab<image>cde", "image": img.tolist()})
    plain = model.process_prompt({"prompt": "hello there"})
    prefill = walk_node(model, "prefill", "LLM")
    env_mixed, env_plain = encode(model, vision, mixed), encode(model, vision, plain)
    in_mixed, in_plain = invoke(prefill, env_mixed), invoke(prefill, env_plain)
    ids = mixed.params["prompt_ids"]
    assert ids.count(IMG) == 6 and in_mixed["segments"] == [
        (3, "causal"), (6, "bidirectional"), (3, "causal")]
    assert in_mixed["expert_ids"].tolist() == [int(i == IMG) for i in ids]

    cache = new_cache(model)
    want = ("logits", "mid_hidden")
    out_mixed, out_plain = run_llm(model, llm, cache, [
        Chunk(SeqKey("a", "LLM"), in_mixed, want), Chunk(SeqKey("b", "LLM"), in_plain, want)])
    for out, plan, im in ((out_mixed, mixed, img), (out_plain, plain, None)):
        full = ref.run(plan.params["prompt_ids"], image=im)
        logits = (full["hidden0"][-1] @ ref.w["lm_head.weight"].T).float()
        torch.testing.assert_close(out["logits"][0], logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["mid_hidden"][0], full["mid"][-1].float(), atol=ATOL,
                                   rtol=0)


def test_decode_after_image_uses_compressed_positions(model, llm, vision, ref):
    """Decode positions come from the prompt layout, not the sequence length (an image of
    2×3 patches takes 3 positions for 6 tokens); a generated token is expert-0 text even
    when its id is a placeholder's."""
    img = image(8, 12, 5)
    plan = model.process_prompt({"prompt": "<image>x", "image": img.tolist()})
    prompt = plan.params["prompt_ids"]
    env = encode(model, vision, plan)
    cache = new_cache(model)
    key = SeqKey("r", "LLM")
    out = run_llm(model, llm, cache, [Chunk(key, invoke(walk_node(model, "prefill", "LLM"),
                                                        env), ("logits",))])[0]
    step = model.next_walk(RequestState("r", plan.params, "lm", "prefill"),
                           {"token_ids": [int(torch.argmax(out["logits"][0]))],
                            "finished": False})
    env = {**plan.params, **step.inputs}
    decode = walk_node(model, "decode", "LLM")
    generated = []
    for it, forced in enumerate((None, FRAME, IMG)):
        if forced is not None:
            env["input_ids"] = [forced]
        generated += env["input_ids"]
        inputs = invoke(decode, env, iteration=it)
        assert inputs["positions"] == plan.params["text_end"] + it  # text: every axis
        out = run_llm(model, llm, cache, [Chunk(key, inputs, ("logits",))])[0]
        expected = ref.logits(prompt + generated, img, text_from=len(prompt))[-1]
        torch.testing.assert_close(out["logits"][0], expected, atol=ATOL, rtol=0)
        env["input_ids"] = [int(torch.argmax(out["logits"][0]))]


# -- denoising -------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_denoise_steps_over_cached_prefix(model, llm, vision, ref, checkpoint, guidance):
    torch.manual_seed(0)
    img = image(8, 8, 6)
    plan = model.process_prompt({"prompt": "pick <image> the red cube", "image": img.tolist(),
                                 "mode": "act", "num_steps": 2, "guidance_scale": guidance,
                                 "seed": 7})
    assert plan.first_walks["lm"].walk == "encode"
    env = encode(model, vision, plan)
    state = RequestState("r", plan.params, "lm", "encode")
    step = model.next_walk(state, {"image_features": env["image_features"]})
    assert step.walk == "prefill_act"

    cache = new_cache(model)
    main = SeqKey("r", "LLM")
    prefix = invoke(walk_node(model, "prefill_act", "LLM"), env)
    assert run_llm(model, llm, cache, [Chunk(main, prefix)]) == [{}]
    n = len(plan.params["prompt_ids"])
    denoise = model.next_walk(RequestState("r", plan.params, "lm", "prefill_act"), {})
    assert denoise.walk == "denoise"
    uncond = SeqKey("r", "LLM", label="uncond")
    for fork in denoise.forks:
        assert fork == Fork("LLM", length=plan.params["uncond_length"], label="uncond")
        cache.fork(main, uncond, length=fork.length)
    assert len(denoise.forks) == (guidance != 1)

    init = load_node(model, "action_init", checkpoint)
    combine = load_node(model, "combine", checkpoint)
    out = init([{}], KeyedNoise([plan.seed]))[0]
    noise = rng.randn((4, 4), seed=7, child=0, site="noise", step=0)
    torch.testing.assert_close(out["x_t"], noise, atol=0, rtol=0)
    env.update(out)
    cond_node = walk_node(model, "denoise", "LLM")
    uncond_node = walk_node(model, "denoise", "LLM_uncond")
    for it in range(plan.params["num_steps"]):
        x, t = env["x_t"].clone(), float(env["t"])
        chunks = [Chunk(main, invoke(cond_node, env, it), ("velocity",))]
        skip = uncond_node.skip(env, it)
        assert skip == (guidance == 1)
        if not skip:
            chunks.append(Chunk(uncond, invoke(uncond_node, env, it), ("velocity",)))
        assert chunks[0].inputs["chunk_mode"] == "scratch"
        assert chunks[0].inputs["input_ids"].tolist() == [ACT] * 4
        outs = run_llm(model, llm, cache, chunks)
        assert cache.length(main) == n  # scratch chunks leave the cache as it was
        torch.testing.assert_close(outs[0]["velocity"], ref.velocity(
            plan.params["prompt_ids"], img, x, t), atol=ATOL, rtol=0)
        env["velocity"] = outs[0]["velocity"]
        item = {k: env[k] for k in ("x_t", "t", "velocity", "guidance_scale", "num_steps")}
        if not skip:
            torch.testing.assert_close(outs[1]["velocity"], ref.velocity(
                plan.params["prompt_ids"], img, x, t, uncond=True), atol=ATOL, rtol=0)
            item["velocity_uncond"] = outs[1]["velocity"]
        env.update(combine([item], None)[0])
    final = ref.act(plan.params["prompt_ids"], img, 2, guidance, noise)
    torch.testing.assert_close(env["x_t"], final, atol=ATOL, rtol=0)
    assert float(env["t"]) == pytest.approx(0.0, abs=1e-6)


# -- frame rollout ---------------------------------------------------------------------------


def test_rollout_step_with_3_axis_positions(model, llm, vision, ref):
    torch.manual_seed(0)
    frame = torch.randn(4, 8)
    plan = model.process_prompt({"prompt": "walk ahead", "mode": "rollout",
                                 "frame": frame.tolist(), "num_frames": 2})
    env = encode(model, vision, plan)
    cache = new_cache(model)
    key = SeqKey("r", "LLM")
    first = run_llm(model, llm, cache, [Chunk(key, invoke(
        walk_node(model, "prefill_rollout", "LLM"), env), ("frame_pred",))])[0]["frame_pred"]
    step = model.next_walk(RequestState("r", plan.params, "lm", "prefill_rollout"),
                           {"frame_pred": first})
    assert step == WalkStep("rollout", inputs={"frame_embeds": first})
    env.update(step.inputs)
    inputs = invoke(walk_node(model, "rollout", "LLM"), env, iteration=0)
    end = plan.params["text_end"]
    assert inputs["input_ids"].tolist() == [FRAME] * 4
    assert inputs["positions"].tolist() == [[end + 1] * 4, [end, end, end + 1, end + 1],
                                            [end, end + 1, end, end + 1]]
    second = run_llm(model, llm, cache, [Chunk(key, inputs, ("frame_pred",))])[0]["frame_pred"]
    expected = ref.rollout(plan.params["prompt_ids"], frame, 2)
    torch.testing.assert_close(first, expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(second, expected[1], atol=ATOL, rtol=0)


# -- consumer --------------------------------------------------------------------------------


def test_consumer_window_and_stream(model, checkpoint, ref):
    torch.manual_seed(0)
    consumer = load_node(model, "consumer", checkpoint)
    codes = torch.randint(0, 256, (9,))
    hidden = torch.randn(9, 64)
    with torch.no_grad():
        window = consumer([{"codes": codes[:4], "hidden": hidden[:4]}], None)[0]["wave"]
        torch.testing.assert_close(window, ref.decode_window(codes[:4], hidden[:4]),
                                   atol=ATOL, rtol=0)
        chunker, streamed = StreamChunker(STREAM_POLICY), []
        for i in range(len(codes) + 1):
            if i < len(codes):
                chunker.push({"codes": codes[i:i + 1], "hidden": hidden[i:i + 1]})
            else:
                chunker.end()
            while (w := chunker.next_window()) is not None:
                wave = consumer([dict(w.units)], None)[0]["wave"]
                streamed.append(slice_emitted(wave, w))
    streamed = torch.cat(streamed)
    assert streamed.shape == (9 * 4,)
    torch.testing.assert_close(streamed, ref.consume(codes, hidden, STREAM_POLICY),
                               atol=ATOL, rtol=0)
    # Windows matter: the stream is not a one-shot decode of the whole utterance.
    assert not torch.allclose(streamed, ref.decode_window(codes, hidden), atol=1e-3)


def test_consumer_delay_is_per_call(model, checkpoint, monkeypatch):
    consumer = load_node(model, "consumer", checkpoint)
    item = {"codes": torch.tensor([1, 2]), "hidden": torch.zeros(2, 64),
            "consumer_delay_s": 0.05}
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    with torch.no_grad():
        consumer([item, dict(item)], None)
    assert slept == [0.05]  # once per call, not per item


# -- host side -------------------------------------------------------------------------------


def test_plugin_is_found_by_entry_point_without_importing_torch():
    assert model_registry().get("testvla").load_class() is TestVLA
    code = ("import sys, mstar_testvla.plugin; "
            "assert 'torch' not in sys.modules, 'plugin imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("request_", "field"), [
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "mode": "dance"}, "mode"),
    ({"prompt": "a <image> b <image>", "image": [[[0.0] * 4] * 4] * 3}, "marker"),
    ({"prompt": "a <image>"}, "image"),
    ({"prompt": "a <image>", "image": [[[0.0] * 4] * 4] * 3}, "followed by text"),
    ({"prompt": "x", "image": [[[0.0] * 4] * 4] * 2}, "channels"),
    ({"prompt": "x", "image": [[[0.0] * 6] * 4] * 3}, "image"),
    ({"prompt": "x", "mode": "act", "num_steps": 0}, "num_steps"),
    ({"prompt": "x", "mode": "act", "guidance_scale": 0.5}, "guidance_scale"),
    ({"prompt": "x", "mode": "rollout"}, "frame"),
    ({"prompt": "x", "mode": "rollout", "frame": [[0.0] * 8] * 3}, "frame"),
    ({"prompt": "x", "mode": "rollout", "frame": [[0.0] * 8] * 4, "num_frames": 65},
     "num_frames"),
    ({"prompt": "x", "mode": "act", "n": 2}, "n > 1"),
    ({"prompt": "x", "mode": "plan", "frame": [[0.0] * 8] * 4}, "goal"),
    ({"prompt": "x", "mode": "plan", "frame": [[0.0] * 8] * 4, "goal": [[0.0] * 8] * 3},
     "goal"),
    ({"prompt": "x", "mode": "plan", "frame": [[0.0] * 8] * 4, "goal": [[0.0] * 8] * 4,
      "plan_samples": 2, "plan_topk": 3}, "plan_topk"),
    ({"prompt": "x", "goal": [[0.0] * 8] * 4}, "goal"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "stop_token_ids": [999]}, "stop_token_ids"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
])
def test_bad_requests_name_the_field(model, request_, field):
    with pytest.raises(ValueError, match=field):
        model.process_prompt(request_)


def test_text_request_plan_and_walk_transitions(model):
    plan = model.process_prompt({"prompt": "hi", "n": 3, "stream_consumer": True,
                                 "temperature": 0, "seed": 5})
    assert plan.first_walks == {"lm": WalkStep("prefill"), "stream": WalkStep("stream")}
    assert plan.seed == 5 and plan.prompt_tokens == 3
    assert plan.sampling["default"].temperature == 0
    assert 257 in plan.sampling["default"].stop_token_ids
    state = RequestState("r", plan.params, "lm", "prefill")
    assert model.next_walk(state, {"finished": True, "finish_reason": "length"}) == \
        Done("length")
    step = model.next_walk(state, {"token_ids": [104], "finished": False})
    assert step == WalkStep("decode", inputs={"input_ids": [104]}, children=3,
                            forks=[Fork("LLM", length=2, child=1),
                                   Fork("LLM", length=2, child=2)])
    state.walk = "decode"
    assert model.next_walk(state, {"finish_reason": "stop"}) == Done("stop")
    assert model.next_walk(RequestState("r", plan.params, "stream", "stream"), {}) == \
        Done("stop")


def test_rollout_of_one_frame_ends_after_prefill(model):
    plan = model.process_prompt({"prompt": "", "mode": "rollout", "frame": [[0.0] * 8] * 4})
    state = RequestState("r", plan.params, "lm", "prefill_rollout")
    assert model.next_walk(state, {"frame_pred": torch.zeros(4, 8)}) == Done("stop")


def test_postprocess_streams_utf8_and_tensors(model):
    def lane(child: int = 0) -> OutputState:  # as the frontend makes it
        return OutputState("r", {}, child, detokenizer=IncrementalDetokenizer(ByteTokenizer()))

    state = lane()
    text = "é!".encode()
    first = model.postprocess({"token_ids": torch.tensor([text[0]])}, state)
    second = model.postprocess({"token_ids": [text[1], text[2], 257]}, state)
    assert first == [TextDelta(text="", token_ids=[text[0]])]
    assert second == [TextDelta(text="é!", token_ids=[text[1], text[2], 257])]
    child = model.postprocess({"token_ids": [104]}, lane(2))
    assert child == [TextDelta(text="h", token_ids=[104], index=2)]
    events = model.postprocess({"wave": torch.ones(8), "x_t": torch.zeros(4, 4),
                                "frame_pred": torch.zeros(4, 8)}, state)
    audio, actions, frame = events
    assert isinstance(audio, AudioChunk) and audio.sample_rate == 16000
    assert audio.samples.to_tensor().tolist() == [1.0] * 8
    assert isinstance(actions, NamedTensor) and actions.name == "actions"
    assert actions.tensor.shape == [4, 4]
    assert isinstance(frame, NamedTensor) and frame.name == "frame"
