"""The Talker against transformers' `Qwen3OmniMoeForConditionalGeneration.generate` (the
oracle) on one tiny seeded checkpoint: its codes frame by frame and the waveform, its
prompt against HF's user and assistant parts, and its weight map at the real size.

The oracle speaks a short prompt greedily; its Thinker's rows (`thinker_embeds`: hidden
state 0, `thinker_hidden`: hidden state `accept_hidden_layer`) are recorded and streamed to
our Talker as the Thinker -> Talker edge would (the prompt's rows and the first generated
token's at once, then one row per Thinker step, then empty windows once the stream ended).
Ours is loaded from the checkpoint's files with the real loader and runs as the engine runs
it: `talker_prepare` makes each invocation's inputs, hand-built `ForwardBatch`es run over a
real paged KV cache and the reference attention backend, the group-0 code is drawn by the
engine's sampler from the logits, the residual codes by `ctx.sample` (greedy).
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeTalkerConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeTalkerForConditionalGeneration,
)

from mstar.config.deployment import SchedulerConfig
from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.engine.kv_engine import KVEngine
from mstar.engine.sampler import SampleRequest, sample
from mstar.engine.work import KeyedStepContext, NodeWork
from mstar.graph.cursor import WalkCursor
from mstar.graph.primitives import GraphNode, Walk
from mstar.graph.program import compile_walk
from mstar.model import config_from_fields
from mstar.model.forward import ForwardBatch, Segment, SeqChunk, SeqKey
from mstar.model.sampling import SamplingParams
from mstar.weights import iter_checkpoint, load_weights
from mstar.weights.sources import checkpoint_files
from mstar_qwen3omni.code2wav import (
    Code2WavConfig,
    Code2WavNode,
    audible_value,
    code2wav_weight_spec,
)
from mstar_qwen3omni.talker import (
    ASSISTANT_ROWS,
    Talker,
    TalkerConfig,
    talker_kv_spec,
    talker_prompt_plan,
    talker_prompt_rows,
    talker_walk,
    talker_weight_spec,
)

torch.set_num_threads(1)
H = 32
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
        "interleaved": True}
IDS = dict(im_start_token_id=290, im_end_token_id=291, tts_pad_token_id=271,
           tts_bos_token_id=272, tts_eos_token_id=273, system_token_id=282, user_token_id=280,
           assistant_token_id=281)
MM = dict(audio_token_id=260, image_token_id=261, video_token_id=262)
TALKER = dict(
    text_config=dict(vocab_size=1088, hidden_size=H, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                     shared_expert_intermediate_size=24, rope_parameters=ROPE),
    code_predictor_config=dict(vocab_size=64, hidden_size=H, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_code_groups=16,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    num_code_groups=16, thinker_hidden_size=H, accept_hidden_layer=1, codec_pad_id=1070,
    codec_bos_id=1071, codec_eos_token_id=1072, codec_nothink_id=1073,
    codec_think_bos_id=1074, codec_think_eos_id=1075, speaker_id={"ethan": 1080, "aiden": 1081},
    spatial_merge_size=2, **MM)
CODE2WAV = dict(codebook_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                sliding_window=4, intermediate_size=64, num_hidden_layers=2, decoder_dim=32,
                upsample_rates=[4, 3], upsampling_ratios=[2])
#: system turn, user turn (text), the assistant header: "<|im_start|>assistant\n".
PROMPT = [290, 282, 10, 11, 291, 12, 290, 280, 20, 21, 22, 23, 291, 12, 290, 281, 12]
THINKER_TOKENS, TALKER_TOKENS = 4, 9


def ours_config(config: Qwen3OmniMoeConfig) -> TalkerConfig:
    top = config.to_dict()
    return TalkerConfig.from_fields(
        top["talker_config"], thinker_vocab_size=config.thinker_config.text_config.vocab_size,
        **{k: top[k] for k in ("tts_pad_token_id", "tts_bos_token_id", "tts_eos_token_id")})


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> tuple[Qwen3OmniMoeForConditionalGeneration, Path]:
    """The tiny seeded Qwen3-Omni and the directory `save_pretrained` wrote (the hub's
    layout: per-expert MoE weights)."""
    config = Qwen3OmniMoeConfig(
        thinker_config=dict(
            text_config=dict(vocab_size=300, hidden_size=H, intermediate_size=48,
                             moe_intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                             rope_parameters=ROPE),
            audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2,
                              encoder_ffn_dim=16, d_model=8, output_dim=H,
                              downsample_hidden_size=8, max_source_positions=16),
            vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2,
                               out_hidden_size=H, num_position_embeddings=16, patch_size=2,
                               deepstack_visual_indexes=[0]),
            vision_start_token_id=263, audio_start_token_id=264, user_token_id=280, **MM),
        talker_config=TALKER, code2wav_config=CODE2WAV, **IDS)
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that every layer matters
        for name, p in model.named_parameters():
            if name.startswith("code2wav."):
                p.copy_(audible_value(name, p.shape, gen))
            elif "norm" in name:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.3, generator=gen)
    directory = tmp_path_factory.mktemp("qwen3omni")
    model.save_pretrained(directory)
    return model, directory


def load_ours(directory: Path, cfg: TalkerConfig, tp_rank: int = 0, tp_size: int = 1,
              tp_group: Any = None) -> tuple[Talker, Code2WavNode]:
    talker = Talker(cfg, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
    spec = talker_weight_spec()
    report = load_weights(talker, iter_checkpoint(checkpoint_files(directory, spec.patterns)),
                          spec, tp_rank=tp_rank, tp_size=tp_size)
    assert set(report.loaded) == set(talker.state_dict())
    code2wav = Code2WavNode(config_from_fields(Code2WavConfig, CODE2WAV))
    spec = code2wav_weight_spec()
    load_weights(code2wav, iter_checkpoint(checkpoint_files(directory, spec.patterns)), spec)
    return talker.eval(), code2wav.eval()


def run_oracle(model: Qwen3OmniMoeForConditionalGeneration) -> dict[str, Any]:
    """HF's greedy speech for PROMPT, with what it computed on the way: the Thinker's
    result (its hidden states) and the codes it handed Code2Wav."""
    seen: dict[str, Any] = {}
    thinker_generate, chunked_decode = model.thinker.generate, model.code2wav.chunked_decode

    def record_thinker(*args, **kwargs):
        seen["thinker"] = thinker_generate(*args, **kwargs)
        return seen["thinker"]

    def record_codes(codes, *args, **kwargs):
        seen["codes"] = codes
        return chunked_decode(codes, *args, **kwargs)

    model.thinker.generate, model.code2wav.chunked_decode = record_thinker, record_codes
    try:
        _, seen["wav"] = model.generate(
            torch.tensor([PROMPT]), speaker="ethan", return_audio=True,
            thinker_do_sample=False, talker_do_sample=False, thinker_eos_token_id=291,
            thinker_max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS)
    finally:
        del model.thinker.generate, model.code2wav.chunked_decode
    return seen


def talker_step(talker: Talker, cache: KVCacheManager, key: SeqKey, inputs: dict[str, Any],
                outputs: tuple[str, ...], work: NodeWork) -> dict[str, torch.Tensor]:
    """One engine step of the Talker for one sequence, from its invocation's inputs."""
    n = int(inputs["input_ids"].shape[0])
    if not cache.has(key):
        cache.create(key)
    start = cache.length(key)
    cache.reserve(key, n)
    positions = inputs["positions"]
    if positions is None:  # the engine continues the sequence
        positions = torch.arange(start, start + n).expand(3, -1)
    spec = talker_kv_spec(talker.config)
    extras = {ex.name: torch.as_tensor(inputs[ex.name]).to(ex.dtype).reshape(n, *ex.shape)
              if ex.name in inputs else torch.full((n, *ex.shape), ex.default, dtype=ex.dtype)
              for ex in spec.extras}
    wanted = [o if o != "token_ids" else "logits" for o in outputs]
    seq = SeqChunk(key=key, start=0, length=n, context_len=start, segments=[Segment(n)],
                   outputs={name: (n - 1, 1) for name in wanted})
    batch = ForwardBatch(input_ids=inputs["input_ids"], positions=positions, seqs=[seq],
                         extras=extras, ctx=KeyedStepContext([work]))
    return forward_step(talker, batch, cache)[0]


def thinker_rows(thinker_result: Any, cfg: TalkerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the Thinker streams: `thinker_embeds` (HF hidden state 0) and
    `thinker_hidden` (hidden state `accept_hidden_layer`) of every row it ran."""
    states = thinker_result.hidden_states
    return (torch.cat([h[0] for h in states], dim=1)[0],
            torch.cat([h[cfg.accept_hidden_layer] for h in states], dim=1)[0])


#: HF's talker sampling under `talker_do_sample=False`: greedy, repetition penalty 1.05.
HF_TALKER = SamplingParams(temperature=0.0, repetition_penalty=1.05)


def stream_to_ours(talker: Talker, embeds: torch.Tensor, hidden: torch.Tensor,
                   tp_size: int = 1, talker_params: SamplingParams = HF_TALKER) -> torch.Tensor:
    """Our Talker walk (`talker_walk` under the runtime's cursor) fed the Thinker's rows as
    the streaming edge feeds them; the frames [F, 16] its steps output, until it draws the
    codec end token or TALKER_TOKENS codes (the engine's `finished`)."""
    cfg = talker.config
    first = len(PROMPT) + 1
    env: dict[str, Any] = talker_prompt_plan(PROMPT, cfg, im_start_id=290, user_id=280,
                                             assistant_id=281)
    env["talker_speaker"] = cfg.speaker_id["ethan"]
    cursor = WalkCursor(compile_walk(Walk(talker_walk(cfg))), env)
    spec = talker_kv_spec(cfg)  # a TP rank's cache holds its share of the KV heads
    spec = dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // tp_size)
    cache = KVCacheManager(PagePool(spec, num_pages=16, page_size=4))
    key = SeqKey("r", "Talker")
    work = NodeWork("r", 0, GraphNode("Talker"), {}, seed=0,
                    sampling=SamplingParams(temperature=0.0))
    frames, drawn, appended = [], [], []
    while not cursor.done:
        step = len(drawn)  # the window the edge hands this invocation (as the worker does)
        lo, hi = (0, first) if step == 0 else (first + step - 1, first + step)
        env.update(text_rows=embeds[lo:hi], hidden_rows=hidden[lo:hi],
                   stream_ended=hi >= embeds.shape[0])
        [invocation] = cursor.pending()
        inputs = cursor.inputs("Talker")
        out = talker_step(talker, cache, key, inputs, invocation.node.outputs, work)
        appended += inputs["input_ids"].tolist()
        code = int(sample(out["logits"], [SampleRequest(
            talker_params, seed=0, child=0, site="Talker", step=cache.length(key),
            history=list(drawn), prompt_ids=list(appended))]).token_ids[0])
        drawn.append(code)
        if "codes" in out:
            frames.append(out["codes"][0])
        del out["logits"]
        cursor.complete("Talker", {**out, "token_ids": torch.tensor([code]), "finished":
                                   code == cfg.codec_eos_token_id or len(drawn) == TALKER_TOKENS})
    return torch.stack(frames)


def test_codes_and_waveform_match_hf_generate(oracle) -> None:
    model, directory = oracle
    cfg = ours_config(model.config)
    talker, code2wav = load_ours(directory, cfg)
    seen = run_oracle(model)
    want = seen["codes"][0].T  # [frames, 16]
    embeds, hidden = thinker_rows(seen["thinker"], cfg)
    # The Talker spoke past the Thinker's last row (tts_eos, then tts_pad) and drew
    # residual codes that differ between groups: the test covers every input kind.
    assert want.shape[0] > embeds.shape[0] - len(PROMPT) and len(set(want[0].tolist())) > 4
    got = stream_to_ours(talker, embeds, hidden)
    assert got.shape == want.shape
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"frame {i}: ours {g.tolist()}, HF {w.tolist()}"
    with torch.no_grad():
        audio = code2wav([{"codes": got}])[0]["audio"]
    torch.testing.assert_close(audio, seen["wav"][0, 0], rtol=1e-5, atol=1e-5)


def test_the_kv_engine_runs_the_walk_as_the_hand_built_steps(oracle) -> None:
    """The Talker walk through a real `KVEngine` (submission of the prepare rule's inputs,
    its positions and extras, the sampler with the codec end token as stop token, the
    max-tokens cut, the residual codes by `ctx.sample`) gives the hand-driven frames."""
    model, directory = oracle
    cfg = ours_config(model.config)
    talker, _ = load_ours(directory, cfg)
    embeds, hidden = thinker_rows(run_oracle(model)["thinker"], cfg)
    spec = talker_kv_spec(cfg)
    engine = KVEngine("Talker", talker, spec, KVCacheManager(PagePool(spec, 16, 4)),
                      max_seq_len=64, scheduler=SchedulerConfig())
    params = SamplingParams(temperature=0.0, stop_token_ids=[cfg.codec_eos_token_id],
                            max_tokens=TALKER_TOKENS)
    env: dict[str, Any] = {**talker_prompt_plan(PROMPT, cfg, im_start_id=290, user_id=280,
                                                assistant_id=281), "talker_speaker": 1080}
    cursor = WalkCursor(compile_walk(Walk(talker_walk(cfg))), env)
    first, frames = len(PROMPT) + 1, []
    while not cursor.done:
        step = len(frames) + 1 if "token_ids" in env else 0
        lo, hi = (0, first) if step == 0 else (first + step - 1, first + step)
        env.update(text_rows=embeds[lo:hi], hidden_rows=hidden[lo:hi],
                   stream_ended=hi >= embeds.shape[0])
        [invocation] = cursor.pending()
        engine.submit(NodeWork("r", 0, invocation.node, cursor.inputs("Talker"), seed=0,
                               sampling=params, iteration=invocation.iteration))
        [result] = engine.step()
        assert result.error is None, result.error
        if "codes" in result.outputs:
            frames.append(result.outputs["codes"][0])
        cursor.complete("Talker", result.outputs)
    want = stream_to_ours(talker, embeds, hidden, talker_params=SamplingParams(temperature=0.0))
    assert len(frames) > embeds.shape[0] - len(PROMPT)  # it spoke past the text's end
    assert torch.equal(torch.stack(frames), want)


def _tp_rank(rank: int, directory: Path, cfg: TalkerConfig, rows: tuple[torch.Tensor, ...],
             out: Path) -> None:
    """One rank of a 2-way TP group (gloo, a file rendezvous): its frames to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=2)
    try:
        talker, _ = load_ours(directory, cfg, rank, 2, dist.group.WORLD)
        torch.save(stream_to_ours(talker, *rows, tp_size=2), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_speak_the_single_rank_codes(oracle, tmp_path: Path) -> None:
    """tp_size 2 over two real processes: each rank holds half the heads (one KV head),
    half of every expert's features and half of each vocabulary (the codec's and the
    Thinker's table); the code predictor and projections are replicated. Both ranks draw
    the single rank's frames."""
    model, directory = oracle
    cfg = ours_config(model.config)
    rows = thinker_rows(run_oracle(model)["thinker"], cfg)
    mp.spawn(_tp_rank, args=(directory, cfg, rows, tmp_path), nprocs=2, join=True)
    want = stream_to_ours(load_ours(directory, cfg)[0], *rows)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want), f"rank {rank}"


def hf_user_rows(ids: list[int]) -> list[int]:
    """HF `generate`'s user rows (its `user_mask`): the row's role is the token after the
    `<|im_start|>` at or before it."""
    t = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    im_start = torch.where(t == IDS["im_start_token_id"], pos, pos.new_full((), -1))
    previous = torch.cummax(im_start, dim=-1).values.clamp_min(0)
    role = t.gather(1, (previous + 1).clamp_max(len(ids) - 1))
    return (role[0] == IDS["user_token_id"]).nonzero().flatten().tolist()


def test_prompt_rows_match_hf_user_and_assistant_parts(oracle) -> None:
    """A multi-turn prompt with audio and image rows in the user turns: our plan and rows,
    embedded by our Talker, against HF's `_get_talker_user_parts` (its rows gathered as
    `generate` does) and `_get_talker_assistant_parts`."""
    model, directory = oracle
    cfg = ours_config(model.config)
    talker, _ = load_ours(directory, cfg)
    ids = [290, 282, 10, 291, 12,  # system
           290, 280, 30, 260, 260, 260, 31, 291, 12,  # user: text and audio
           290, 281, 40, 41, 291, 12,  # an earlier assistant answer
           290, 280, 261, 261, 32, 291, 12,  # user: image
           290, 281, 12]
    n = len(ids) + 1  # and the first generated token's row
    gen = torch.Generator().manual_seed(3)
    embeds, hidden = torch.randn(1, n, H, generator=gen), torch.randn(1, n, H, generator=gen)
    plan = talker_prompt_plan(ids, cfg, im_start_id=290, user_id=280, assistant_id=281)
    assert plan["talker_user_rows"] == hf_user_rows(ids)
    rows = talker_prompt_rows(embeds[0], hidden[0], {**plan, "talker_speaker": 1081}, cfg)
    with torch.no_grad():
        got = talker.embed(rows, rows["talker_kind"].shape[0])
        mm = torch.tensor([[t in (260, 261, 262) for t in ids] + [False]])
        user = model._get_talker_user_parts(0, n, mm, hidden, embeds)[0, hf_user_rows(ids)]
        specials = torch.tensor([[271, 272, 273]])
        bos, eos, pad = model.talker.text_projection(
            model.thinker.get_input_embeddings()(specials))[:, [1, 2, 0]].chunk(3, dim=1)
        assistant, _, trailing = model._get_talker_assistant_parts(
            len(ids) - 3, n, 1081, embeds, pad, bos, eos)
    want = torch.cat([user, assistant[0]])
    assert got.shape == want.shape == (len(plan["talker_user_rows"]) + ASSISTANT_ROWS, H)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert trailing.shape[1] == 1  # nothing of the first window is left to speak later


def test_prompt_plan_refuses_a_prompt_not_ending_in_the_assistant_header(oracle) -> None:
    cfg = ours_config(oracle[0].config)
    with pytest.raises(ValueError, match="assistant"):
        talker_prompt_plan([290, 280, 5, 291, 12, 290, 281, 12, 7], cfg, im_start_id=290,
                           user_id=280, assistant_id=281)


#: The real Talker's sizes (Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json talker_config).
REAL = dict(
    text_config=dict(vocab_size=3072, hidden_size=1024, intermediate_size=2048,
                     num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=2,
                     head_dim=128, moe_intermediate_size=384, num_experts=128,
                     num_experts_per_tok=6, shared_expert_intermediate_size=768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                      "mrope_section": [24, 20, 20], "interleaved": True}),
    code_predictor_config=dict(vocab_size=2048, hidden_size=1024, intermediate_size=3072,
                               num_hidden_layers=5, num_attention_heads=16,
                               num_key_value_heads=8, head_dim=128, num_code_groups=16),
    num_code_groups=16, thinker_hidden_size=2048, spatial_merge_size=2)


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """transformers' in-memory state dict -> the hub's keys and shapes: fused experts
    (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) become per-expert 2-D weights."""
    out = {}
    for key, value in state.items():
        head, _, last = key.rpartition(".")
        if last == "gate_up_proj":
            for e in range(value.shape[0]):
                half = value.shape[1] // 2
                out[f"{head}.{e}.gate_proj.weight"] = (half, value.shape[2])
                out[f"{head}.{e}.up_proj.weight"] = (half, value.shape[2])
        elif last == "down_proj" and head.endswith("experts"):
            for e in range(value.shape[0]):
                out[f"{head}.{e}.down_proj.weight"] = tuple(value.shape[1:])
        else:
            out[key] = tuple(value.shape)
    return out


def test_real_size_weight_map_covers_the_hub_keys_both_ways() -> None:
    """On the meta device at the real size: every hub `talker.*` key (and the Thinker's
    embedding table) maps to one of our parameters with its shape, and every parameter of
    ours is filled."""
    with torch.device("meta"):
        theirs = Qwen3OmniMoeTalkerForConditionalGeneration(Qwen3OmniMoeTalkerConfig(**REAL))
        ours = Talker(TalkerConfig.from_fields(Qwen3OmniMoeTalkerConfig(**REAL).to_dict()))
    hub = {f"talker.{k}": v for k, v in hub_layout(theirs.state_dict()).items()}
    hub["thinker.model.embed_tokens.weight"] = (152064, 2048)
    spec = talker_weight_spec()
    mapped = {spec.map_key(k): shape for k, shape in hub.items()}
    assert spec.map_key("code2wav.decoder.0.conv.weight") is None
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mapped == mine
    assert ours.rotary.sections == (24, 20, 20) and ours.rotary.interleaved
    assert sum(1 for k in hub if ".experts." in k) == 20 * 128 * 3


def test_saved_checkpoint_keys_are_the_hub_layout(oracle) -> None:
    """What the tiny oracle's `save_pretrained` wrote is the layout `hub_layout` derives
    (per-expert keys), so the real-size check above reads the hub's names."""
    model, directory = oracle
    saved = {k: tuple(v.shape) for f in glob.glob(str(directory / "*.safetensors"))
             for k, v in load_file(f).items() if k.startswith("talker.")}
    derived = {f"talker.{k}": v for k, v in hub_layout(model.talker.state_dict()).items()}
    assert saved == derived
