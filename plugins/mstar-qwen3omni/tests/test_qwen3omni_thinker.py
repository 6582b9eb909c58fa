"""The Thinker against transformers' `Qwen3OmniMoeThinkerForConditionalGeneration` (its text
model and LM head) on the same files, and its weight map against the real 30B-A3B layout.

The oracle is a tiny seeded thinker (3 layers, one of them dense, 6 experts top-2) saved
with `save_pretrained` (transformers writes the hub's per-expert layout) and then prefixed
`thinker.` as in the full Qwen3-Omni checkpoint, beside a stray `talker.` key. Ours is
loaded from that file with the real loader and driven as the runtime drives it: hand-built
ragged `ForwardBatch`es over a real paged KV cache and the reference attention backend.
Every step is compared with transformers run from scratch over the whole sequence.
transformers is imported where the oracle is used: the tensor-parallel test's rank
processes import this module and need no oracle.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.model import config_from_fields
from mstar.model.forward import ForwardBatch, Segment, SeqChunk, SeqKey
from mstar.weights import WeightLoadError, iter_checkpoint, load_weights
from mstar.weights.sources import checkpoint_files
from mstar_qwen3omni.thinker import (
    Thinker,
    ThinkerTextConfig,
    thinker_kv_spec,
    thinker_weight_spec,
)

torch.set_num_threads(1)
ATOL = 1e-4
HIDDEN, DEEPSTACK, ACCEPT = 32, 2, 2
TEXT = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 2, 2], "interleaved": True})
OUTPUTS = ("logits", "thinker_embeds", "thinker_hidden")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Any, Path]:
    """The tiny seeded oracle (`Qwen3OmniMoeThinkerForConditionalGeneration`) and the
    directory of its `thinker.`-prefixed weights."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerConfig,
    )
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    torch.manual_seed(0)
    config = Qwen3OmniMoeThinkerConfig(
        text_config=TEXT,
        audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=16, d_model=8, output_dim=HIDDEN,
                          downsample_hidden_size=8, max_source_positions=16),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2,
                           out_hidden_size=HIDDEN, num_position_embeddings=16, patch_size=2,
                           deepstack_visual_indexes=[0, 0]))
    oracle = Qwen3OmniMoeThinkerForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights large enough that every layer matters
        for name, p in oracle.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3)
    saved = tmp_path_factory.mktemp("saved")
    oracle.save_pretrained(saved)
    hub = tmp_path_factory.mktemp("qwen3omni")
    weights = {f"thinker.{k}": v for f in saved.glob("*.safetensors")
               for k, v in load_file(f).items()}
    weights["talker.codec_head.weight"] = torch.zeros(2, 2)
    save_file(weights, str(hub / "model-00001-of-00001.safetensors"))
    return oracle, hub


def load_ours(hub: Path, tp_rank: int = 0, tp_size: int = 1, tp_group: object = None
              ) -> Thinker:
    """Our Thinker (rank `tp_rank` of `tp_size`) loaded from the files by its weight spec."""
    cfg = config_from_fields(ThinkerTextConfig, TEXT)
    module = Thinker(cfg, accept_hidden_layer=ACCEPT, tp_rank=tp_rank, tp_size=tp_size,
                     tp_group=tp_group)
    spec = thinker_weight_spec(cfg)
    report = load_weights(module, iter_checkpoint(checkpoint_files(hub, spec.patterns)), spec,
                          tp_rank=tp_rank, tp_size=tp_size)
    assert set(report.loaded) == set(module.state_dict())
    return module.eval()


@dataclasses.dataclass
class Prompt:
    """One sequence: token ids, positions [3, n], and its media rows (mm_mask 1: mm_embeds
    replace the token embedding; on the `visual` ones deepstack rows are added after the
    first layers, zeros elsewhere)."""

    ids: list[int]
    positions: torch.Tensor
    mm_mask: torch.Tensor
    mm_embeds: torch.Tensor
    deepstack: torch.Tensor
    visual: torch.Tensor

    def append(self, token: int) -> None:
        nxt = int(self.positions.max()) + 1
        self.ids.append(token)
        self.positions = torch.cat([self.positions, torch.full((3, 1), nxt)], dim=1)
        self.mm_mask = torch.cat([self.mm_mask, torch.zeros(1, dtype=torch.long)])
        self.mm_embeds = torch.cat([self.mm_embeds, torch.zeros(1, HIDDEN)])
        self.deepstack = torch.cat([self.deepstack, torch.zeros(1, DEEPSTACK, HIDDEN)])
        self.visual = torch.cat([self.visual, torch.zeros(1, dtype=torch.bool)])


def text_prompt(ids: list[int]) -> Prompt:
    n = len(ids)
    return Prompt(list(ids), torch.arange(n).expand(3, -1).clone(),
                  torch.zeros(n, dtype=torch.long), torch.zeros(n, HIDDEN),
                  torch.zeros(n, DEEPSTACK, HIDDEN), torch.zeros(n, dtype=torch.bool))


def media_prompt() -> Prompt:
    """4 text rows, 3 "audio" rows (media, no deepstack; equal axes), a 2x3 "image" (t
    fixed, h and w its grid), 2 text rows after it (the next position is one past the
    largest, as get_rope_index places them): 15 rows."""
    p = text_prompt([5, 17, 3, 44, 91, 91, 91])
    p.mm_mask[4:] = 1
    p.mm_embeds[4:] = torch.randn(3, HIDDEN)
    grid_h, grid_w = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    image = torch.stack([torch.full((6,), 7), 7 + grid_h.flatten(), 7 + grid_w.flatten()])
    p.ids += [90] * 6
    p.positions = torch.cat([p.positions, image], dim=1)
    p.mm_mask = torch.cat([p.mm_mask, torch.ones(6, dtype=torch.long)])
    p.mm_embeds = torch.cat([p.mm_embeds, torch.randn(6, HIDDEN)])
    p.deepstack = torch.cat([p.deepstack, torch.randn(6, DEEPSTACK, HIDDEN)])
    p.visual = torch.cat([p.visual, torch.ones(6, dtype=torch.bool)])
    for token in (61, 8):
        p.append(token)
    return p


def oracle_run(oracle: Any, p: Prompt) -> dict[str, torch.Tensor]:
    """transformers over the whole sequence: the same inputs_embeds (media spliced), 3-axis
    positions and deepstack rows through the text model; every row's outputs."""
    text = oracle.model.language_model
    visual = p.visual
    with torch.no_grad():
        embeds = text.embed_tokens(torch.tensor(p.ids))
        embeds = torch.where(p.mm_mask.bool()[:, None], p.mm_embeds, embeds)
        deepstack = [p.deepstack[visual, i] for i in range(DEEPSTACK)] if visual.any() else None
        out = text(inputs_embeds=embeds[None], position_ids=p.positions[:, None, :],
                   visual_pos_masks=visual[None], deepstack_visual_embeds=deepstack,
                   output_hidden_states=True)
        logits = oracle.lm_head(out.last_hidden_state)[0]
    return {"logits": logits, "thinker_embeds": out.hidden_states[0][0],
            "thinker_hidden": out.hidden_states[ACCEPT][0]}


def step(module: Thinker, cache: KVCacheManager,
         chunks: list[tuple[SeqKey, Prompt, int, int]], with_extras: bool = True
         ) -> list[dict[str, torch.Tensor]]:
    """One engine step over (sequence, prompt, first row, end row) chunks, ragged; every
    output on every row except logits (last row). Extras left out when not `with_extras`
    (the node's defaults: text rows)."""
    seqs, parts, start = [], [], 0
    for key, p, a, b in chunks:
        if not cache.has(key):
            cache.create(key)
        cache.reserve(key, b - a)
        n = b - a
        seqs.append(SeqChunk(key=key, start=start, length=n, context_len=cache.length(key),
                             segments=[Segment(n)],
                             outputs={"logits": (n - 1, 1), "thinker_embeds": (0, n),
                                      "thinker_hidden": (0, n)}))
        parts.append((p, a, b))
        start += n

    extras = {}
    if with_extras:
        extras = {"mm_mask": torch.cat([p.mm_mask[a:b] for p, a, b in parts]),
                  "mm_embeds": torch.cat([p.mm_embeds[a:b] for p, a, b in parts]),
                  "deepstack": torch.cat([p.deepstack[a:b] for p, a, b in parts])}
    batch = ForwardBatch(input_ids=torch.tensor([i for p, a, b in parts for i in p.ids[a:b]]),
                         positions=torch.cat([p.positions[:, a:b] for p, a, b in parts], dim=1),
                         seqs=seqs, extras=extras)
    return forward_step(module, batch, cache)


def test_thinker_matches_transformers_over_media_prefill_and_decode(checkpoint) -> None:
    """Sequence a: a text chunk (no extras given), then its audio and image rows + text
    with mm_embeds/deepstack, batched with sequence b's whole text prompt; then both decode
    greedily. Logits (last row), thinker_embeds and thinker_hidden (every row) match
    transformers' within 1e-4 at every step."""
    oracle, hub = checkpoint
    ours = load_ours(hub)
    assert ours.model.layers[1].mlp.__class__.__name__ == "GatedMLP"
    spec = thinker_kv_spec(ours.config, deepstack_layers=DEEPSTACK)
    cache = KVCacheManager(PagePool(spec, num_pages=32, page_size=4))
    a, b = SeqKey("a", "Thinker"), SeqKey("b", "Thinker")
    prompts = {a: media_prompt(), b: text_prompt([7, 1, 30, 2, 66])}
    assert not torch.equal(prompts[a].positions[0], prompts[a].positions[1])

    got = {a: step(ours, cache, [(a, prompts[a], 0, 4)], with_extras=False)[0]}
    first = {name: [got[a][name]] for name in ("thinker_embeds", "thinker_hidden")}
    got = dict(zip((a, b), step(ours, cache, [(a, prompts[a], 4, 15),
                                              (b, prompts[b], 0, 5)])))
    for name in first:
        got[a][name] = torch.cat([*first[name], got[a][name]])
    done = {a: 0, b: 0}
    for i in range(4):
        for key, outs in got.items():
            want = oracle_run(oracle, prompts[key])
            rows = slice(done[key], len(prompts[key].ids))
            for name in OUTPUTS:
                expected = want[name][-1:] if name == "logits" else want[name][rows]
                torch.testing.assert_close(outs[name], expected, atol=ATOL, rtol=0,
                                           msg=f"{key.request_id}: {name} differs, step {i}")
            done[key] = len(prompts[key].ids)
            prompts[key].append(int(outs["logits"][0].argmax()))
        got = dict(zip((a, b), step(ours, cache, [(k, prompts[k], done[k], done[k] + 1)
                                                  for k in (a, b)], with_extras=False)))
    assert cache.length(a) == len(prompts[a].ids)


def greedy(module: Thinker, tp_size: int, prompt: Prompt, steps: int
           ) -> dict[str, torch.Tensor]:
    """Prefill `prompt` (media rows included), then `steps` greedy decode steps: every
    output of every step, concatenated. A TP rank's cache holds its share of the KV heads,
    as the engine sizes it."""
    spec = thinker_kv_spec(module.config, deepstack_layers=DEEPSTACK)
    spec = dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // tp_size)
    cache = KVCacheManager(PagePool(spec, num_pages=16, page_size=4))
    key, p = SeqKey("r", "Thinker"), copy.deepcopy(prompt)
    outs = step(module, cache, [(key, p, 0, len(p.ids))])
    for _ in range(steps):
        p.append(int(outs[-1]["logits"][0].argmax()))
        outs += step(module, cache, [(key, p, len(p.ids) - 1, len(p.ids))], with_extras=False)
    return {name: torch.cat([o[name] for o in outs]) for name in OUTPUTS}


def _tp_rank(rank: int, hub: Path, prompt: Prompt, out: Path) -> None:
    """One rank of a 2-way TP group (gloo, a file rendezvous): its outputs to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=2)
    try:
        module = load_ours(hub, tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
        torch.save(greedy(module, 2, prompt, 3), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_match_one_rank(checkpoint, tmp_path: Path) -> None:
    """tp_size 2 over two real processes: each rank holds half the heads, half of every
    expert's (and the dense MLP's) intermediate features and half the vocabulary, the MoE
    all-reduces once per layer, and both ranks produce the single-rank outputs."""
    _, hub = checkpoint
    torch.manual_seed(1)
    prompt = media_prompt()
    mp.spawn(_tp_rank, args=(hub, prompt, tmp_path), nprocs=2, join=True)
    want = greedy(load_ours(hub), 1, prompt, 3)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in OUTPUTS:
            torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0,
                                       msg=f"rank {rank}: {name}")


REAL = dict(vocab_size=152064, hidden_size=2048, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [24, 20, 20], "interleaved": True})


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_30b_weight_map_covers_the_hub_keys(tp_rank: int, tp_size: int) -> None:
    """The real 30B-A3B text config on the meta device: every key of the hub's thinker
    text model (per expert, `thinker.`-prefixed) loads into exactly one parameter of ours,
    every parameter of ours is loaded, and keys of other nodes are ignored."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeTextConfig,
    )
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerTextModel,
    )

    with torch.device("meta"):
        oracle = Qwen3OmniMoeThinkerTextModel(Qwen3OmniMoeTextConfig(**REAL))
        ours = Thinker(config_from_fields(ThinkerTextConfig, REAL), accept_hidden_layer=18,
                       tp_rank=tp_rank, tp_size=tp_size)
    defaults = ThinkerTextConfig()
    assert all(getattr(defaults, k) == v for k, v in REAL.items() if k != "rope_parameters")
    assert (ours.config.rope_base, ours.config.mrope_section) == \
        (defaults.rope_base, defaults.mrope_section) == (1e6, (24, 20, 20))
    hub = {}
    for key, value in oracle.state_dict().items():
        if key.endswith("experts.gate_up_proj"):
            for e in range(128):
                for proj in ("gate_proj", "up_proj"):
                    hub[f"thinker.model.{key[:-len('gate_up_proj')]}{e}.{proj}.weight"] = \
                        torch.empty(768, 2048, device="meta")
        elif key.endswith("experts.down_proj"):
            for e in range(128):
                hub[f"thinker.model.{key[:-len('down_proj')]}{e}.down_proj.weight"] = \
                    torch.empty(2048, 768, device="meta")
        elif "rotary" not in key:
            hub[f"thinker.model.{key}"] = value
    hub["thinker.lm_head.weight"] = torch.empty(152064, 2048, device="meta")
    hub["thinker.audio_tower.conv2d1.weight"] = torch.empty(1, device="meta")
    assert len(hub) == 2 + 1 + 1 + 48 * (8 + 1 + 3 * 128)
    report = load_weights(ours, hub.items(), thinker_weight_spec(ours.config),
                          tp_rank=tp_rank, tp_size=tp_size)
    assert set(report.loaded) == set(ours.state_dict())
    if tp_size > 1:
        layer = ours.model.layers[0]
        assert (layer.self_attn.heads, layer.self_attn.kv_heads) == (16, 2)
        assert layer.mlp.experts[5].gate_proj.weight.shape == (384, 2048)
        assert layer.mlp.experts[5].down_proj.weight.shape == (2048, 384)
        assert layer.mlp.gate.weight.shape == (128, 2048)

    broken = dict(hub)
    del broken["thinker.model.layers.7.mlp.experts.3.up_proj.weight"]
    with pytest.raises(WeightLoadError) as err:
        load_weights(ours, broken.items(), thinker_weight_spec(ours.config), tp_rank=tp_rank,
                     tp_size=tp_size)
    assert err.value.missing == ["model.layers.7.mlp.experts.3.up_proj.weight"]


def test_thinker_rejects_an_accept_layer_that_is_no_layer_output() -> None:
    cfg = config_from_fields(ThinkerTextConfig, TEXT)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="accept_hidden_layer"):
            Thinker(cfg, accept_hidden_layer=bad)


def test_config_reads_rope_settings_as_the_hub_and_transformers_5_write_them() -> None:
    hub = config_from_fields(ThinkerTextConfig, {
        "rope_theta": 500.0, "rope_scaling": {"mrope_section": [4, 2, 2], "interleaved": True,
                                              "rope_type": "default"}})
    v5 = config_from_fields(ThinkerTextConfig, {"rope_theta": None, "rope_parameters": {
        "rope_theta": 500.0, "mrope_section": [4, 2, 2], "rope_type": "default"}})
    assert (hub.rope_base, hub.mrope_section) == (v5.rope_base, v5.mrope_section) == \
        (500.0, (4, 2, 2))
