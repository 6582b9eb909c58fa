"""The AC predictor node against the authors' `VisionTransformerPredictorAC` (the PyPI
`cc-vjepa2` fork, whose ac_predictor.py is the authors' file) on the same random weights,
saved as the authors' pickled dict and loaded by core's loader through our key map. The
node runs as the engine runs it: frames appended as bidirectional chunks to a real
`KVCacheManager`, attention by core's torch backend.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from authors_code import authors_ac_module, authors_ac_predictor

from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.model import KVSpec
from mstar.model.forward import ForwardBatch, SeqChunk, SeqKey
from mstar.weights import WeightSpec, iter_checkpoint, load_weights
from mstar_vjepa2.ac_predictor import (
    KV_OUTPUTS,
    POSITION_AXES,
    PRESETS,
    WEIGHT_KEY_MAPS,
    ACPredictor,
    ACPredictorConfig,
    frame_inputs,
    kv_extras,
    next_frame,
)
from mstar_vjepa2.cem import CEMScore, initial_distribution, sample_actions
from mstar_vjepa2.model import AC_PRESETS, ACVideoEncoder, VJepa2AC, VJepa2ACConfig
from mstar_vjepa2.pose import compute_new_pose

# head_dim 16 (4 dims unrotated) and a non-square 3x4 grid (the authors' column snapping)
CFG = dataclasses.replace(ACPredictorConfig(**PRESETS["tiny"]), img_size=(24, 32))
GH, GW = CFG.grid
P, D = CFG.patches_per_frame, CFG.embed_dim


def authors_predictor(cfg: ACPredictorConfig, seed: int) -> torch.nn.Module:
    """The authors' predictor, every parameter random (biases and norms included), at a
    scale (0.1) five times the authors' init: float32 rounding stays near 1e-6 while a
    wrong rotation, mask or position moves outputs by O(1)."""
    return randomize(authors_ac_predictor(cfg), seed).eval()


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module


def save_authors_checkpoint(predictor: torch.nn.Module, path: Path) -> Path:
    """The released file's layout: {"encoder": ..., "predictor": ...}, DDP and backbone
    prefixes on every key, plus non-tensor bookkeeping."""
    torch.save({"encoder": {"module.backbone.patch_embed.proj.weight": torch.zeros(2, 3)},
                "predictor": {f"module.backbone.{k}": v.clone()
                              for k, v in predictor.state_dict().items()},
                "epoch": 315}, path)
    return path


def load_node(cfg: ACPredictorConfig, path: Path) -> ACPredictor:
    node = ACPredictor(cfg)
    load_weights(node, iter_checkpoint([path]), WeightSpec(key_map=WEIGHT_KEY_MAPS["ac_predictor"]))
    return node.eval()


@pytest.fixture(scope="module")
def oracle() -> torch.nn.Module:
    return authors_predictor(CFG, seed=0)


@pytest.fixture(scope="module")
def node(oracle: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> ACPredictor:
    path = save_authors_checkpoint(oracle, tmp_path_factory.mktemp("ac") / "vjepa2-ac.pt")
    return load_node(CFG, path)


def new_cache(cfg: ACPredictorConfig = CFG) -> KVCacheManager:
    spec = KVSpec(num_layers=cfg.depth, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
                  position_axes=POSITION_AXES, extras=kv_extras(cfg), outputs=KV_OUTPUTS)
    return KVCacheManager(PagePool(spec, num_pages=256, page_size=8))


def step(node: ACPredictor, cache: KVCacheManager, chunks: list[tuple[SeqKey, list[dict]]]
         ) -> list[torch.Tensor]:
    """One engine step: each sequence appends its frames (one bidirectional segment each)
    as one chunk and wants `next_latents` on every row -> each sequence's predictions of
    the frame after each of its frames [frames, P, D]."""
    seqs, parts, start = [], [], 0
    for key, frames in chunks:
        n = sum(f["input_ids"].shape[0] for f in frames)
        if not cache.has(key):
            cache.create(key)
        cache.reserve(key, n)
        seqs.append(SeqChunk(key=key, start=start, length=n, context_len=cache.length(key),
                             segments=[s for f in frames for s in f["segments"]],
                             outputs={"next_latents": (0, n)}))
        parts.extend(frames)
        start += n
    batch = ForwardBatch(
        input_ids=torch.cat([f["input_ids"] for f in parts]),
        positions=torch.cat([f["positions"] for f in parts], dim=1), seqs=seqs,
        extras={e.name: torch.cat([f["extras"][e.name] for f in parts]).to(e.dtype)
                for e in kv_extras(node.cfg)})
    out = forward_step(node, batch, cache)
    k = node.cfg.tokens_per_frame
    return [torch.stack([next_frame(r, node.cfg) for r in o["next_latents"].split(k)])
            for o in out]


def clip(seed: int, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(frames, P, D, generator=gen), torch.randn(frames, 7, generator=gen),
            torch.randn(frames, 7, generator=gen))


def frames_of(latents: torch.Tensor, actions: torch.Tensor, states: torch.Tensor,
              first: int = 0) -> list[dict]:
    return [frame_inputs(z, a, s, first + t, CFG)
            for t, (z, a, s) in enumerate(zip(latents, actions, states))]


def test_every_authors_key_maps_and_nothing_else_loads(oracle: torch.nn.Module) -> None:
    spec = WeightSpec(key_map=WEIGHT_KEY_MAPS["ac_predictor"])
    names = dict(ACPredictor(CFG).named_parameters())
    assert {spec.map_key(f"predictor.module.backbone.{k}") for k in oracle.state_dict()} \
        == set(names)
    assert spec.map_key("encoder.module.backbone.blocks.0.attn.qkv.weight") is None


def test_frames_appended_one_step_at_a_time_match_the_authors(
        oracle: torch.nn.Module, node: ACPredictor) -> None:
    """Three frames, each its own step appended to the cache, and a second sequence whose
    two context frames go in one chunk (two segments) in the same step as the first's
    frame 0: the authors' block-causal forward over the whole clip."""
    z, a, s = clip(1, 3)
    z2, a2, s2 = clip(2, 2)
    with torch.no_grad():
        want = oracle(z.flatten(0, 1)[None], a[None], s[None])[0].view(3, P, D)
        want2 = oracle(z2.flatten(0, 1)[None], a2[None], s2[None])[0].view(2, P, D)
    cache = new_cache()
    key, key2 = SeqKey("r", "ac_predictor"), SeqKey("q", "ac_predictor")
    got, got2 = step(node, cache, [(key, frames_of(z[:1], a[:1], s[:1])),
                                   (key2, frames_of(z2, a2, s2))])
    got = [got[0]] + [step(node, cache, [(key, frames_of(z[t:t + 1], a[t:t + 1],
                                                         s[t:t + 1], first=t))])[0][0]
                      for t in (1, 2)]
    torch.testing.assert_close(torch.stack(got), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got2, want2, atol=1e-5, rtol=0)
    assert cache.length(key) == 3 * CFG.tokens_per_frame


def test_rollout_with_the_persistent_cache_equals_the_authors_recompute(
        oracle: torch.nn.Module, node: ACPredictor) -> None:
    """N steps of the authors' world-model loop (world_model_wrapper's step_predictor: the
    whole trajectory through the predictor each step, the last frame's prediction
    layer-normed, the pose integrated from the last action) against one cached frame
    appended per step."""
    steps = 4
    z0, actions, pose0 = clip(3, 1)[0], 0.05 * clip(4, steps)[1], torch.rand(1, 7)
    # the reference
    reps, poses = F.layer_norm(z0, (D,)), pose0
    with torch.no_grad():
        for h in range(steps):
            pred = oracle(reps.flatten(0, 1)[None], actions[None, :h + 1], poses[None])[0]
            reps = torch.cat([reps, F.layer_norm(pred[-P:], (D,))[None]])
            poses = torch.cat([poses, compute_new_pose(poses[-1:], actions[h:h + 1])])
    # the cache: frame h appended at step h
    cache, key = new_cache(), SeqKey("r", "ac_predictor")
    latents, pose, got = F.layer_norm(z0[0], (D,)), pose0[0], []
    for h in range(steps):
        frame = frame_inputs(latents, actions[h], pose, h, CFG)
        latents = F.layer_norm(step(node, cache, [(key, [frame])])[0][0], (D,))
        pose = compute_new_pose(pose, actions[h])
        got.append(latents)
    torch.testing.assert_close(torch.stack(got), reps[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(pose, poses[-1])


def test_candidates_forked_from_a_shared_history_match_the_authors(
        oracle: torch.nn.Module, node: ACPredictor) -> None:
    """A planner's round: two history frames (actions taken) prefilled once under their
    own label; three candidates fork it, and in one batched step each appends the current
    frame with its own action, then its predicted frame with its second action. Each equals
    the authors' forward over its whole trajectory."""
    z, a, s = clip(8, 3)
    gen = torch.Generator().manual_seed(9)
    first, second = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    cache, ctx = new_cache(), SeqKey("r", "ac_predictor", "ctx")
    step(node, cache, [(ctx, frames_of(z[:2], a[:2], s[:2]))])
    kids = [SeqKey("r", "ac_predictor", "cand", c) for c in range(3)]
    for kid in kids:
        cache.fork(ctx, kid)
    nxt = step(node, cache, [(kid, [frame_inputs(z[2], first[c], s[2], 2, CFG)])
                             for c, kid in enumerate(kids)])
    last = step(node, cache, [(kid, [frame_inputs(nxt[c][0], second[c], s[2], 3, CFG)])
                              for c, kid in enumerate(kids)])
    for c in range(3):
        zs = torch.cat([z, nxt[c]])
        acts = torch.stack([a[0], a[1], first[c], second[c]])
        with torch.no_grad():
            want = oracle(zs.flatten(0, 1)[None], acts[None],
                          torch.cat([s, s[2:]])[None])[0].view(4, P, D)
        torch.testing.assert_close(torch.cat([nxt[c], last[c]]), want[2:], atol=1e-5, rtol=0)
    assert cache.length(ctx) == 2 * CFG.tokens_per_frame


def test_plan_over_cached_rollouts_equals_the_authors_world_model(
        authors: dict[str, torch.Tensor], authors_params: dict[str, Any],
        node: ACPredictor) -> None:
    """The authors' planner end to end: `WorldModel.infer_next_action` (their `cem` over
    their recompute-everything step_predictor on this predictor's weights, layer-normed
    latents, scipy poses; a fixture, conftest.py) against ours: each round every candidate
    appends the current frame with its first action, then its prediction with its second
    (the candidates batched in one step per horizon step), and `CEMScore` joins them. Same
    noise: what the authors' `cem` drew, per round."""
    args = authors_params["world_model"]
    samples, topk, horizon, maxnorm = (args[k] for k in ("samples", "topk", "rollout",
                                                         "maxnorm"))
    z, goal, pose = authors["world.latents"], authors["world.goal"], authors["world.pose"]
    cache, mean, std = new_cache(), *initial_distribution(horizon, maxnorm)
    kids = [SeqKey("p", "ac_predictor", "cand", c) for c in range(samples)]
    for noise in authors["world.noise"]:
        actions = sample_actions(mean, std, noise, maxnorm)
        latents, poses = [z] * samples, [pose] * samples
        for h in range(horizon):
            out = step(node, cache, [(kid, [frame_inputs(latents[c], actions[c, h], poses[c],
                                                         h, CFG)])
                                     for c, kid in enumerate(kids)])
            latents = [F.layer_norm(o[0], (D,)) for o in out]
            poses = [compute_new_pose(p, a) for p, a in zip(poses, actions[:, h])]
        joined = CEMScore()([{"final_latents": torch.stack(latents), "actions": actions,
                              "goal_latents": goal, "topk": topk, "maxnorm": maxnorm,
                              "cem_mean": mean, "cem_std": std}])[0]
        mean, std = joined["cem_mean"], joined["cem_std"]
        for kid in kids:  # the next round starts each candidate afresh
            cache.free(kid)
    torch.testing.assert_close(joined["plan_actions"], authors["world.plan"], atol=1e-5, rtol=0)


def test_extrinsics_token_and_square_vitg_rope_match_the_authors(tmp_path: Path) -> None:
    """The third conditioning token (extrinsics: 6 values) on a square grid."""
    cfg = dataclasses.replace(ACPredictorConfig(**PRESETS["tiny"]), use_extrinsics=True,
                              num_heads=2)
    oracle = authors_predictor(cfg, seed=5)
    node = load_node(cfg, save_authors_checkpoint(oracle, tmp_path / "ac.pt"))
    p = cfg.patches_per_frame
    gen = torch.Generator().manual_seed(6)
    z, a, s, e = (torch.randn(2, p, cfg.embed_dim, generator=gen),
                  torch.randn(2, 7, generator=gen), torch.randn(2, 7, generator=gen),
                  torch.randn(2, 6, generator=gen))
    with torch.no_grad():
        want = oracle(z.flatten(0, 1)[None], a[None], s[None], e[None])[0].view(2, p, -1)
    frames = [frame_inputs(z[t], a[t], s[t], t, cfg, extrinsics=e[t]) for t in range(2)]
    got = step(node, new_cache(cfg), [(SeqKey("r", "ac_predictor"), frames)])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_released_layout_loads_both_nodes_and_its_encoder_is_the_authors_vit(
        oracle: torch.nn.Module, tmp_path: Path) -> None:
    """One authors' file ({"encoder", "predictor"}, `module.backbone.` keys) through
    VJepa2AC's weight specs: the predictor as above, the encoder (the authors' RoPE ViT,
    q/k/v fused in `attn.qkv`) into the fused-qkv VideoEncoder, whose latents of a frame
    (a tubelet of it repeated, as the authors' WorldModel.encode) are the authors'."""
    authors_ac_module()
    from vjepa2.models.vision_transformer import VisionTransformer

    model = VJepa2AC(VJepa2ACConfig(**AC_PRESETS["tiny"]))
    enc_cfg = model.config.encoder
    vit = VisionTransformer(
        img_size=(enc_cfg.crop_size, enc_cfg.crop_size), patch_size=enc_cfg.patch_size,
        num_frames=enc_cfg.frames_per_clip, tubelet_size=enc_cfg.tubelet_size,
        embed_dim=enc_cfg.hidden_size, depth=enc_cfg.num_hidden_layers,
        num_heads=enc_cfg.num_attention_heads, mlp_ratio=enc_cfg.mlp_ratio, qkv_bias=True,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rope=True,
        uniform_power=False, use_sdpa=True, use_SiLU=False, wide_SiLU=True).eval()
    randomize(vit, seed=11)
    path = tmp_path / "vjepa2-ac.pt"
    torch.save({"encoder": {f"module.backbone.{k}": v.clone()
                            for k, v in vit.state_dict().items()},
                "predictor": {f"module.backbone.{k}": v.clone()
                              for k, v in oracle.state_dict().items()}}, path)
    encoder = ACVideoEncoder(enc_cfg, normalize=False)
    load_weights(encoder, iter_checkpoint([path]), model.weight_spec("video_encoder"))
    predictor = ACPredictor(model.config.predictor)
    load_weights(predictor, iter_checkpoint([path]), model.weight_spec("ac_predictor"))
    frame = torch.randn(1, 3, enc_cfg.crop_size, enc_cfg.crop_size,
                        generator=torch.Generator().manual_seed(12))
    tubelet = frame.repeat(enc_cfg.tubelet_size, 1, 1, 1)
    with torch.no_grad():
        want = vit(tubelet.transpose(0, 1)[None])[0]
        got = encoder.eval()([{"pixel_values": tubelet}])[0]["latents"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(torch.equal(predictor.state_dict()[k], v) for k, v in oracle.state_dict().items())


def test_frame_inputs_refuse_what_the_predictor_cannot_read() -> None:
    z, a, s = clip(7, 1)
    with pytest.raises(ValueError, match="latents must be"):
        frame_inputs(z[0, :-1], a[0], s[0], 0, CFG)
    with pytest.raises(ValueError, match="action must have 7"):
        frame_inputs(z[0], a[0, :6], s[0], 0, CFG)
    with pytest.raises(ValueError, match="outside the predictor's 8 frames"):
        frame_inputs(z[0], a[0], s[0], CFG.max_frames, CFG)
    with pytest.raises(ValueError, match="is_frame_causal"):
        ACPredictorConfig(is_frame_causal=False)
