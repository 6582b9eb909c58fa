"""Pi0.5's node modules against independent implementations, on the `tiny` sizes.

Random weights in lerobot's checkpoint layout are written to a safetensors file and loaded
through `WEIGHT_KEY_MAPS` with core's loader, as the runtime loads them. The oracles:
transformers' `GemmaModel` (PaliGemma's prefix, and the action expert with its adaptive
norms made plain) and `SiglipVisionModel` on the same weights, and a plain-torch reading of
Pi0.5's equations written here (joint attention over [prefix; action block] with lerobot's
mask, adaRMS, gated residuals, the flow-time MLP). The LLM runs as the engine runs it: a
`ForwardBatch` over a real paged cache and the reference attention backend.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mstar.engine import rng
from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.engine.work import KeyedStepContext, NodeWork
from mstar.graph import GraphNode
from mstar.model import KVSpec
from mstar.model.forward import ExtraSpec, ForwardBatch, Segment, SeqChunk, SeqKey
from mstar.model.sampling import SamplingParams
from mstar.weights import WeightSpec, iter_checkpoint, load_weights
from mstar_pi05.config import PRESETS, Pi05Config
from mstar_pi05.modules import (
    TIED_EMBEDDING,
    WEIGHT_KEY_MAPS,
    ActionInit,
    Combine,
    Pi05LLM,
    VitEncoder,
)

ATOL = 1e-5
CFG = Pi05Config(**PRESETS["tiny"], action_horizon=5)
PG, EX = CFG.paligemma, CFG.action_expert
PALIGEMMA = "paligemma_with_expert.paligemma."
EXPERT = "paligemma_with_expert.gemma_expert."


def gemma_config(size: Any) -> Any:
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=CFG.vocab_size, hidden_size=size.width,
                       intermediate_size=size.mlp_dim, num_hidden_layers=size.depth,
                       num_attention_heads=size.num_heads, num_key_value_heads=size.num_kv_heads,
                       head_dim=size.head_dim, hidden_activation="gelu_pytorch_tanh",
                       rms_norm_eps=CFG.rms_norm_eps, attn_implementation="eager")


def randomize_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Gemma initialises its norm weights to 0 (scale 1): make them count."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.data = 0.3 * torch.randn(p.shape, generator=gen)


class Oracle:
    """The reference models on one set of random weights, and that set as lerobot stores it
    (`state`: keys with the leading `model.`)."""

    def __init__(self) -> None:
        from transformers import GemmaForCausalLM, GemmaModel, SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        self.paligemma = GemmaForCausalLM(gemma_config(PG)).eval()
        self.expert = GemmaModel(gemma_config(EX)).eval()  # its norms: the plain-norm check
        v = CFG.vision
        self.vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=CFG.image_resolution[0], patch_size=v.patch_size,
            vision_use_head=False)).eval()
        for m in (self.paligemma, self.expert):
            randomize_norms(m, gen)
        self.projector = nn.Linear(v.hidden_size, PG.width)
        self.extra = {  # Pi0.5's own layers
            name: nn.Linear(i, o) for name, (i, o) in {
                "action_in_proj": (CFG.max_action_dim, EX.width),
                "action_out_proj": (EX.width, CFG.max_action_dim),
                "time_mlp_in": (EX.width, EX.width), "time_mlp_out": (EX.width, EX.width)}.items()}
        state = {f"{PALIGEMMA}model.language_model.{k.removeprefix('model.')}": p
                 for k, p in self.paligemma.state_dict().items() if k.startswith("model.")}
        state[f"{PALIGEMMA}lm_head.weight"] = self.paligemma.lm_head.weight
        # transformers 5.25 flattens SiglipVisionModel; lerobot's (5.5) keeps `vision_model.`
        state |= {f"{PALIGEMMA}model.vision_tower.vision_model.{k.removeprefix('vision_model.')}": p
                  for k, p in self.vision.state_dict().items()}
        state |= {f"{PALIGEMMA}model.multi_modal_projector.linear.{k}": p
                  for k, p in self.projector.state_dict().items()}
        state |= {f"{EXPERT}model.{k}": p for k, p in self.expert.state_dict().items()
                  if "norm" not in k and "embed_tokens" not in k}
        state[f"{EXPERT}lm_head.weight"] = torch.randn(CFG.vocab_size, EX.width, generator=gen)
        norms = [f"layers.{i}.{n}" for i in range(EX.depth)
                 for n in ("input_layernorm", "post_attention_layernorm")] + ["norm"]
        for n in norms:
            state[f"{EXPERT}model.{n}.dense.weight"] = 0.2 * torch.randn(3 * EX.width, EX.width,
                                                                       generator=gen)
            state[f"{EXPERT}model.{n}.dense.bias"] = 0.2 * torch.randn(3 * EX.width, generator=gen)
        for name, layer in self.extra.items():
            state |= {f"{name}.{k}": p for k, p in layer.state_dict().items()}
        self.state = {f"model.{k}": p.detach().clone().contiguous() for k, p in state.items()}


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture(scope="module")
def checkpoint(oracle: Oracle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pi05") / "model.safetensors"
    save_file(oracle.state, str(path))
    return path


def load(module: nn.Module, node: str, checkpoint: Path) -> nn.Module:
    load_weights(module, iter_checkpoint([checkpoint]), WeightSpec(key_map=WEIGHT_KEY_MAPS[node]))
    return module.eval()


@pytest.fixture(scope="module")
def llm(checkpoint: Path) -> Pi05LLM:
    return load(Pi05LLM(CFG), "LLM", checkpoint)


def test_every_lerobot_key_maps_with_or_without_the_model_prefix(oracle: Oracle) -> None:
    """Each node takes its own keys and drops the others'; the leading `model.` is
    optional; the action steps take none."""
    modules = {"LLM": Pi05LLM(CFG), "vit_encoder": VitEncoder(CFG)}
    for node, module in modules.items():
        spec = WeightSpec(key_map=WEIGHT_KEY_MAPS[node])
        for prefix in ("model.", ""):
            names = {spec.map_key(k.removeprefix("model.") if not prefix else k)
                     for k in oracle.state} - {None}
            assert names == set(module.state_dict()), node
    assert all(WeightSpec(key_map=WEIGHT_KEY_MAPS[n]).map_key(k) is None
               for n in ("action_init", "combine") for k in oracle.state)
    # lerobot's own renames of older checkpoints
    spec = WeightSpec(key_map=WEIGHT_KEY_MAPS["LLM"])
    assert spec.map_key("action_time_mlp_in.weight") == "time_mlp_in.weight"
    assert spec.map_key(f"{EXPERT}model.layers.0.input_layernorm.weight") is None


def test_a_checkpoint_without_embed_tokens_loads_the_tied_lm_head(oracle: Oracle) -> None:
    embed = f"model.{PALIGEMMA}model.language_model.embed_tokens.weight"
    lm_head = oracle.state[f"model.{PALIGEMMA}lm_head.weight"]
    state = {k: v for k, v in oracle.state.items() if k != embed} | {
        f"model.{PALIGEMMA}lm_head.weight": lm_head + 1}
    llm = Pi05LLM(CFG)
    load_weights(llm, state.items(), WeightSpec(key_map=(TIED_EMBEDDING,
                                                         *WEIGHT_KEY_MAPS["LLM"])))
    assert torch.equal(llm.paligemma.embed_tokens.weight, lm_head + 1)


def test_one_kv_head_cannot_be_split_across_ranks() -> None:
    """Pi0.5 has one KV head and core's KV cache holds whole heads per rank: tp_size 2 is
    refused when the module is built, naming the heads."""
    with pytest.raises(ValueError, match="num_key_value_heads=1 must be divisible by tp_size=2"):
        Pi05LLM(CFG, tp_rank=0, tp_size=2)


# -- the LLM as the engine runs it -------------------------------------------------------------


def kv_spec(kv_heads: int = PG.num_kv_heads) -> KVSpec:
    """The LLM's KV spec as the wiring contract declares it (`kv_heads`: a rank's)."""
    return KVSpec(num_layers=PG.depth, num_kv_heads=kv_heads, head_dim=PG.head_dim,
                  extras=(ExtraSpec("expert_ids", "token", (), torch.long, 0),
                          ExtraSpec("is_image", "token", (), torch.long, 0),
                          ExtraSpec("image_embeds", "token", (PG.width,)),
                          ExtraSpec("x_t", "token", (CFG.max_action_dim,)),
                          ExtraSpec("t", "seq", ())),
                  outputs={"velocity": "all"})


def step(llm: Pi05LLM, cache: KVCacheManager, chunks: list[dict[str, Any]]
         ) -> list[dict[str, torch.Tensor]]:
    """One engine step over `chunks` (key, ids, positions, mode, extras by name), each one
    bidirectional segment; action chunks want `velocity` on every row."""
    spec = kv_spec()
    seqs, start = [], 0
    for ch in chunks:
        n, mode = len(ch["ids"]), ch["mode"]
        if not cache.has(ch["key"]):
            cache.create(ch["key"])
        if mode == "append":
            cache.reserve(ch["key"], n)
        outputs = {"velocity": (0, n)} if mode == "scratch" else {}
        seqs.append(SeqChunk(key=ch["key"], start=start, length=n,
                             context_len=cache.length(ch["key"]),
                             segments=[Segment(n, "bidirectional")], mode=mode, outputs=outputs))
        start += n
    extras = {}
    for ex in spec.extras:
        rows = [len(ch["ids"]) if ex.per == "token" else 1 for ch in chunks]
        extras[ex.name] = torch.cat([
            torch.as_tensor(ch[ex.name]).to(ex.dtype).reshape(r, *ex.shape) if ex.name in ch
            else torch.full((r, *ex.shape), ex.default, dtype=ex.dtype)
            for ch, r in zip(chunks, rows)])
    batch = ForwardBatch(input_ids=torch.cat([torch.as_tensor(ch["ids"]) for ch in chunks]),
                         positions=torch.cat([ch["positions"] for ch in chunks]), seqs=seqs,
                         extras=extras)
    return forward_step(llm, batch, cache)


class Prefix:
    """One robot's prefix: camera features then prompt token ids."""

    def __init__(self, cams: int, text: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.image = torch.randn(cams * CFG.tokens_per_image, PG.width, generator=gen)
        self.text = torch.randint(1, CFG.vocab_size, (text,), generator=gen)
        n = len(self) - text
        self.is_image = torch.tensor([1] * n + [0] * text)
        self.image_rows = torch.cat([self.image, torch.zeros(text, PG.width)])

    def __len__(self) -> int:
        return self.image.shape[0] + self.text.shape[0]

    def chunk(self, key: SeqKey) -> dict[str, Any]:
        ids = torch.cat([torch.zeros(self.image.shape[0], dtype=torch.long), self.text])
        return {"key": key, "ids": ids, "positions": torch.arange(len(self)), "mode": "append",
                "expert_ids": torch.zeros(len(self)), "is_image": self.is_image,
                "image_embeds": self.image_rows}


def action_chunk(key: SeqKey, prefix_len: int, x_t: torch.Tensor, t: float) -> dict[str, Any]:
    h = x_t.shape[0]
    return {"key": key, "ids": torch.zeros(h, dtype=torch.long), "mode": "scratch",
            "positions": torch.arange(prefix_len, prefix_len + h),
            "expert_ids": torch.ones(h), "x_t": x_t, "t": torch.tensor(t)}


PREFIXES = (Prefix(cams=2, text=7, seed=3), Prefix(cams=1, text=4, seed=4))
KEYS = (SeqKey("a", "LLM"), SeqKey("b", "LLM"))


def prefilled(llm: Pi05LLM) -> KVCacheManager:
    """Both robots' prefixes in one ragged step."""
    cache = KVCacheManager(PagePool(kv_spec(), num_pages=64, page_size=4))
    assert step(llm, cache, [p.chunk(k) for p, k in zip(PREFIXES, KEYS)]) == [{}, {}]
    return cache


def transformers_prefix(oracle: Oracle, p: Prefix) -> Any:
    """transformers' Gemma over the same prefix: image features as they are, token embeddings
    through its (sqrt(width)-scaled) embedding, attention bidirectional; its KV cache."""
    text = oracle.paligemma.model
    with torch.no_grad():
        embeds = torch.cat([p.image, text.embed_tokens(p.text)])[None]
        n = len(p)
        out = text(inputs_embeds=embeds, attention_mask=torch.zeros(1, 1, n, n),
                   position_ids=torch.arange(n)[None], use_cache=True)
    return out.past_key_values


def test_paligemma_prefix_cache_matches_transformers_gemma(oracle: Oracle, llm: Pi05LLM) -> None:
    """Two prefixes [camera features, prompt] in one ragged bidirectional prefill: every
    layer's cached K and V (post-RoPE) equal transformers' for the same prefix (each layer's
    K/V depends on every layer below, embedding scale included)."""
    cache = prefilled(llm)
    for p, key in zip(PREFIXES, KEYS):
        want = transformers_prefix(oracle, p)
        assert cache.length(key) == len(p)
        for layer in range(PG.depth):
            k, v = cache.gather(layer, key, len(p))
            torch.testing.assert_close(k, want.layers[layer].keys[0].transpose(0, 1),
                                       atol=ATOL, rtol=0, msg=f"K of layer {layer}")
            torch.testing.assert_close(v, want.layers[layer].values[0].transpose(0, 1),
                                       atol=ATOL, rtol=0, msg=f"V of layer {layer}")


# -- the action expert -------------------------------------------------------------------------


def reference_velocity(state: dict[str, torch.Tensor], p: Prefix, x_t: torch.Tensor,
                       t: float) -> torch.Tensor:
    """Pi0.5's velocity written from its equations (openpi / lerobot's training forward), on
    the checkpoint's tensors: [prefix; actions] through both Gemma stacks layer by layer, each
    stack normalising and projecting its own rows, one attention over all rows with the
    prefix bidirectional and blind to the actions and the actions seeing everything."""
    def w(key: str) -> torch.Tensor:
        return state[f"model.{key}"]

    def rms(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps)

    def gemma_norm(x: torch.Tensor, key: str) -> tuple[torch.Tensor, None]:
        return rms(x) * (1 + w(f"{key}.weight")), None

    def ada_norm(x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = F.linear(cond, w(f"{key}.dense.weight"),
                                      w(f"{key}.dense.bias")).chunk(3, -1)
        return rms(x) * (1 + scale) + shift, gate

    def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x [n, heads, d]
        d = x.shape[-1]
        inv = CFG.rope_theta ** (-torch.arange(0, d, 2).float() / d)
        ang = pos[:, None].float() * inv
        cos, sin = ang.cos()[:, None].repeat(1, 1, 2), ang.sin()[:, None].repeat(1, 1, 2)
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    half = EX.width // 2
    period = CFG.min_period * (CFG.max_period / CFG.min_period) ** (
        torch.arange(half, dtype=torch.float64) / (half - 1))
    angle = 2 * math.pi * t / period
    temb = torch.cat([angle.sin(), angle.cos()]).float()[None]
    cond = F.silu(F.linear(F.silu(F.linear(temb, w("time_mlp_in.weight"),
                                           w("time_mlp_in.bias"))),
                           w("time_mlp_out.weight"), w("time_mlp_out.bias")))

    n, h = len(p), x_t.shape[0]
    emb = w(f"{PALIGEMMA}model.language_model.embed_tokens.weight")[p.text] * PG.width ** 0.5
    xs = [torch.cat([p.image, emb]),
          F.linear(x_t, w("action_in_proj.weight"), w("action_in_proj.bias"))]
    stacks = [(f"{PALIGEMMA}model.language_model.layers", gemma_norm),
              (f"{EXPERT}model.layers", ada_norm)]
    pos = torch.arange(n + h)
    allowed = torch.ones(n + h, n + h, dtype=torch.bool)
    allowed[:n, n:] = False
    groups = PG.num_heads // PG.num_kv_heads
    for i in range(PG.depth):
        qs, ks, vs, gates = [], [], [], []
        for x, (prefix, norm) in zip(xs, stacks):
            xn, gate = norm(x, f"{prefix}.{i}.input_layernorm")
            gates.append(gate)
            for out, name in ((qs, "q"), (ks, "k"), (vs, "v")):
                out.append(xn @ w(f"{prefix}.{i}.self_attn.{name}_proj.weight").T)
        q = rope(torch.cat(qs).view(n + h, PG.num_heads, PG.head_dim), pos)
        k = rope(torch.cat(ks).view(n + h, PG.num_kv_heads, PG.head_dim), pos)
        v = torch.cat(vs).view(n + h, PG.num_kv_heads, PG.head_dim)
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(PG.head_dim)
        att = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -math.inf).softmax(-1),
                           v).reshape(n + h, -1)
        outs = [att[:n], att[n:]]
        for j, (prefix, norm) in enumerate(stacks):
            y = outs[j] @ w(f"{prefix}.{i}.self_attn.o_proj.weight").T
            x = xs[j] + (y if gates[j] is None else y * gates[j])
            xn, gate = norm(x, f"{prefix}.{i}.post_attention_layernorm")
            mlp = F.linear(F.gelu(xn @ w(f"{prefix}.{i}.mlp.gate_proj.weight").T,
                                  approximate="tanh")
                           * (xn @ w(f"{prefix}.{i}.mlp.up_proj.weight").T),
                           w(f"{prefix}.{i}.mlp.down_proj.weight"))
            xs[j] = x + (mlp if gate is None else mlp * gate)
    out, _ = ada_norm(xs[1], f"{EXPERT}model.norm")
    return F.linear(out, w("action_out_proj.weight"), w("action_out_proj.bias"))


def test_action_expert_step_matches_the_equations(oracle: Oracle, llm: Pi05LLM) -> None:
    """Both robots' action blocks (different flow times) in one scratch step over their
    cached prefixes: the velocity equals the plain-torch equations; the step leaves the
    cache as it was, so a second step gives the same velocities."""
    cache = prefilled(llm)
    gen = torch.Generator().manual_seed(5)
    x_ts = [torch.randn(CFG.action_horizon, CFG.max_action_dim, generator=gen) for _ in KEYS]
    times = (1.0, 0.3)
    chunks = [action_chunk(k, len(p), x, t) for k, p, x, t in zip(KEYS, PREFIXES, x_ts, times)]
    got = step(llm, cache, chunks)
    for out, p, x, t in zip(got, PREFIXES, x_ts, times):
        want = reference_velocity(oracle.state, p, x, t)
        torch.testing.assert_close(out["velocity"], want, atol=ATOL, rtol=0)
    again = step(llm, cache, chunks)
    assert [cache.length(k) for k in KEYS] == [len(p) for p in PREFIXES]
    for a, b in zip(got, again):
        torch.testing.assert_close(a["velocity"], b["velocity"], atol=0, rtol=0)


def test_prefill_and_denoise_of_two_robots_share_a_step(oracle: Oracle, llm: Pi05LLM) -> None:
    """Robot a's action block and robot b's prefix in one step (both experts' rows, routed
    and scattered back): a's velocity and then b's match the equations."""
    cache = KVCacheManager(PagePool(kv_spec(), num_pages=64, page_size=4))
    (pa, pb), (a, b) = PREFIXES, KEYS
    x_t = torch.randn(CFG.action_horizon, CFG.max_action_dim,
                      generator=torch.Generator().manual_seed(8))
    step(llm, cache, [pa.chunk(a)])
    got_a, got_b = step(llm, cache, [action_chunk(a, len(pa), x_t, 0.8), pb.chunk(b)])
    assert got_b == {} and cache.length(b) == len(pb)
    torch.testing.assert_close(got_a["velocity"], reference_velocity(oracle.state, pa, x_t, 0.8),
                               atol=ATOL, rtol=0)
    got_b = step(llm, cache, [action_chunk(b, len(pb), x_t, 0.1)])[0]
    torch.testing.assert_close(got_b["velocity"], reference_velocity(oracle.state, pb, x_t, 0.1),
                               atol=ATOL, rtol=0)


def test_action_expert_with_plain_norms_matches_transformers_gemma(
        oracle: Oracle, checkpoint: Path) -> None:
    """adaRMS with dense = (0, bias [w, 0, 1]) is Gemma's norm with weight w and no gate:
    the expert then is transformers' GemmaModel reading PaliGemma's prefix cache."""
    llm = load(Pi05LLM(CFG), "LLM", checkpoint)
    norms = {n: m for n, m in llm.expert.named_modules() if n.endswith("norm")}
    with torch.no_grad():
        for name, norm in norms.items():
            weight = oracle.expert.state_dict()[f"{name}.weight"]
            norm.dense.weight.zero_()
            norm.dense.bias.copy_(torch.cat([weight, torch.zeros_like(weight),
                                             torch.ones_like(weight)]))
    cache = prefilled(llm)
    p, key = PREFIXES[0], KEYS[0]
    x_t = torch.randn(CFG.action_horizon, CFG.max_action_dim,
                      generator=torch.Generator().manual_seed(6))
    got = step(llm, cache, [action_chunk(key, len(p), x_t, 0.6)])[0]["velocity"]
    past = copy.deepcopy(transformers_prefix(oracle, p))
    n, h = len(p), CFG.action_horizon
    with torch.no_grad():
        embeds = oracle.extra["action_in_proj"](x_t)[None]
        out = oracle.expert(inputs_embeds=embeds, cache=past,
                            attention_mask=torch.zeros(1, 1, h, n + h),
                            position_ids=torch.arange(n, n + h)[None], use_cache=True)
        want = oracle.extra["action_out_proj"](out.last_hidden_state[0])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# Pi0.5's sizes with two KV heads: what tensor parallelism would need.
TP_CFG = dataclasses.replace(CFG, paligemma=dataclasses.replace(PG, num_kv_heads=2),
                             action_expert=dataclasses.replace(EX, num_kv_heads=2))


def two_robots(llm: Pi05LLM, kv_heads: int) -> list[torch.Tensor]:
    """Robot a's prefill; a's action block beside b's prefill; b's action block: the
    velocities."""
    cache = KVCacheManager(PagePool(kv_spec(kv_heads), num_pages=64, page_size=4))
    (pa, pb), (a, b) = PREFIXES, KEYS
    x_t = torch.randn(CFG.action_horizon, CFG.max_action_dim,
                      generator=torch.Generator().manual_seed(10))
    step(llm, cache, [pa.chunk(a)])
    got_a = step(llm, cache, [action_chunk(a, len(pa), x_t, 0.9), pb.chunk(b)])[0]
    got_b = step(llm, cache, [action_chunk(b, len(pb), x_t, 0.2)])[0]
    return [got_a["velocity"], got_b["velocity"]]


def _tp_rank(rank: int, weights: Path, out: Path) -> None:
    """One rank of a 2-way TP group (gloo, a file rendezvous): its velocities to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=2)
    try:
        llm = Pi05LLM(TP_CFG, tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
        load_weights(llm, iter_checkpoint([weights]), WeightSpec(), tp_rank=rank, tp_size=2)
        torch.save(two_robots(llm.eval(), kv_heads=1), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_match_one_rank(tmp_path: Path) -> None:
    """With two KV heads, tp_size 2 over two real processes (each rank half the heads, half
    of both stacks' MLPs, half the vocabulary; the adaptive norms, time MLP and action
    projections replicated) gives the single-rank velocities on both ranks."""
    one = Pi05LLM(TP_CFG)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in one.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    weights = tmp_path / "llm.safetensors"
    save_file(one.state_dict(), str(weights))
    mp.spawn(_tp_rank, args=(weights, tmp_path), nprocs=2, join=True)
    want = two_robots(one.eval(), kv_heads=2)
    for rank in range(2):
        for got, expected in zip(torch.load(tmp_path / f"rank{rank}.pt"), want):
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"rank {rank}")


# -- vision -----------------------------------------------------------------------------------


def test_vit_encoder_matches_siglip_and_projector(oracle: Oracle, checkpoint: Path) -> None:
    """Two robots (3 cameras and 1) in one ragged pass: each camera's features are
    transformers' SigLIP + the projector on that image, cameras in order."""
    vit = load(VitEncoder(CFG), "vit_encoder", checkpoint)
    gen = torch.Generator().manual_seed(7)
    r = CFG.image_resolution[0]
    items = [{"pixel_values": torch.rand(n, 3, r, r, generator=gen) * 2 - 1} for n in (3, 1)]
    with torch.no_grad():
        got = vit(items, None)
        for item, out in zip(items, got):
            hidden = oracle.vision(pixel_values=item["pixel_values"]).last_hidden_state
            want = oracle.projector(hidden).reshape(-1, PG.width)
            assert out["image_features"].shape == (len(item["pixel_values"])
                                                   * CFG.tokens_per_image, PG.width)
            torch.testing.assert_close(out["image_features"], want, atol=ATOL, rtol=0)


# -- flow matching ----------------------------------------------------------------------------


def keyed(seeds: list[int], device: str = "cpu") -> KeyedStepContext:
    return KeyedStepContext([NodeWork(request_id=f"r{i}", child=0,
                                      node=GraphNode("action_init"), inputs={}, seed=s,
                                      sampling=SamplingParams())
                             for i, s in enumerate(seeds)], torch.device(device))


def test_action_init_noise_is_keyed_by_the_seed() -> None:
    init = ActionInit(CFG)
    shape = (CFG.action_horizon, CFG.max_action_dim)
    given = torch.randn(shape)
    a, b, c = init([{}, {}, {"noise": given}], keyed([7, 8, 9]))
    again = init([{}], keyed([7]))[0]
    assert a["x_t"].shape == shape and a["x_t"].dtype == torch.float32
    assert torch.equal(a["x_t"], again["x_t"])
    assert torch.equal(a["x_t"], rng.randn(shape, seed=7, child=0, site="noise", step=0))
    assert not torch.equal(a["x_t"], b["x_t"])
    assert torch.equal(c["x_t"], given)
    assert float(a["t"]) == 1.0
    # on the engine's device, drawn or given (it meets the LLM's velocity there)
    on_meta = init([{}, {"noise": given}], keyed([7, 9], device="meta"))
    assert {out["x_t"].device.type for out in on_meta} == {"meta"}


def test_combine_is_one_euler_step_landing_on_openpi_times() -> None:
    """x <- x + dt·v with dt = -1/steps; after k steps t is 1 + k·dt as openpi computes it
    (in float64, then float32 where the LLM reads it)."""
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    out = Combine()([{"x_t": x, "t": torch.tensor(1.0), "velocity": v, "num_steps": 4}])[0]
    torch.testing.assert_close(out["x_t"], x - 0.25 * v, atol=0, rtol=0)
    assert float(out["t"]) == 0.75
    for steps in (3, 7, 10):
        state = ActionInit(CFG)([{"noise": torch.zeros(CFG.action_horizon,
                                                       CFG.max_action_dim)}], keyed([0]))[0]
        for k in range(1, steps):
            state = Combine()([{**state, "velocity": torch.zeros_like(state["x_t"]),
                                "num_steps": steps}])[0]
            assert state["t"].float() == torch.tensor(1.0 + k * (-1.0 / steps),
                                                      dtype=torch.float32)
