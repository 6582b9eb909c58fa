"""BAGEL's MoT LLM node (`mstar_bagel.llm`) on weights written once in BAGEL's own
`ema.safetensors` layout (key names as the authors' `qwen2_navit.py` / `bagel.py` build
them) and loaded through the real loader with `llm_key_map`.

- The understanding expert's text path is Qwen3 with QKV bias and a zero o_proj bias, so
  `transformers.Qwen3ForCausalLM` on the same weights is its oracle (chunked prefill, then
  greedy decode over the paged cache, logits within 1e-4).
- The generation expert alone is the same Qwen3 built from the `*_moe_gen` weights and
  `norm_moe_gen`, fed BAGEL's latent input embedding (diffusers' DiT timestep frequencies).
- A mixed step (a scratch chunk of text and latent rows, bidirectional, over a cached
  prefix of text and ViT rows) is checked against `DenseMoT`, a plain reading written here
  of BAGEL's rule "each row uses its own expert's weights, attention over all rows": a rule
  check, not an independent oracle (fixtures from the authors' code come later).

Ours runs as the engine runs it: hand-built ragged `ForwardBatch`es over a real
`KVCacheManager` and the reference `TorchAttention` backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.model import KVSpec, config_from_fields
from mstar.model.forward import ForwardBatch, Segment, SeqChunk, SeqKey
from mstar.model.layers.embeddings import sincos_2d_table
from mstar.weights.loader import WeightLoadError, iter_checkpoint, load_weights
from mstar.weights.spec import WeightSpec
from mstar_bagel.llm import BagelLLM, LLMConfig, kv_extras, llm_key_map

torch.set_num_threads(1)
ATOL = 1e-4
CFG = LLMConfig.tiny()
LATENT_DIM = 16  # 2×2 latent patch of 4 channels
MAX_LATENT = 8
GEN = "_moe_gen"
Weights = dict[str, torch.Tensor]


def bagel_layout(cfg: LLMConfig, latent_dim: int, max_latent: int) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) of BAGEL's `ema.safetensors` the LLM node reads, as BAGEL's
    modules name them, plus a ViT and connector key the node must leave alone."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    out = {"language_model.model.embed_tokens.weight": (cfg.vocab_size, h),
           "language_model.model.norm.weight": (h,),
           "language_model.model.norm_moe_gen.weight": (h,),
           "language_model.lm_head.weight": (cfg.vocab_size, h),
           "vae2llm.weight": (h, latent_dim), "vae2llm.bias": (h,),
           "llm2vae.weight": (latent_dim, h), "llm2vae.bias": (latent_dim,),
           "time_embedder.mlp.0.weight": (h, 256), "time_embedder.mlp.0.bias": (h,),
           "time_embedder.mlp.2.weight": (h, h), "time_embedder.mlp.2.bias": (h,),
           "latent_pos_embed.pos_embed": (max_latent ** 2, h),
           "vit_model.vision_model.post_layernorm.weight": (8,),
           "connector.fc1.weight": (h, 8)}
    for i in range(cfg.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        for s in ("", GEN):
            out |= {f"{p}self_attn.q_proj{s}.weight": (q, h), f"{p}self_attn.q_proj{s}.bias": (q,),
                    f"{p}self_attn.k_proj{s}.weight": (kv, h),
                    f"{p}self_attn.k_proj{s}.bias": (kv,),
                    f"{p}self_attn.v_proj{s}.weight": (kv, h),
                    f"{p}self_attn.v_proj{s}.bias": (kv,),
                    f"{p}self_attn.o_proj{s}.weight": (h, q),
                    f"{p}self_attn.q_norm{s}.weight": (d,), f"{p}self_attn.k_norm{s}.weight": (d,),
                    f"{p}mlp{s}.gate_proj.weight": (inter, h), f"{p}mlp{s}.up_proj.weight": (inter, h),
                    f"{p}mlp{s}.down_proj.weight": (h, inter),
                    f"{p}input_layernorm{s}.weight": (h,),
                    f"{p}post_attention_layernorm{s}.weight": (h,)}
    return out


def seeded_weights(seed: int = 0) -> Weights:
    """Random weights in BAGEL's layout: norms around 1, the position table as BAGEL's."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for key, shape in bagel_layout(CFG, LATENT_DIM, MAX_LATENT).items():
        if key.endswith("norm.weight") or "norm_" in key or "layernorm" in key:
            w[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            w[key] = 0.1 * torch.randn(shape, generator=g)
    w["latent_pos_embed.pos_embed"] = sincos_2d_table(CFG.hidden_size, MAX_LATENT)
    return w


@pytest.fixture(scope="module")
def weights() -> Weights:
    return seeded_weights()


@pytest.fixture(scope="module")
def checkpoint(weights: Weights, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bagel") / "ema.safetensors"
    save_file(weights, str(path))
    return path


def load_ours(path: Path, tp_rank: int = 0, tp_size: int = 1, tp_group: object = None
              ) -> BagelLLM:
    """Our node (rank `tp_rank` of `tp_size`) loaded from BAGEL's file by `llm_key_map`;
    the ViT and connector keys are ignored."""
    module = BagelLLM(CFG, latent_dim=LATENT_DIM, max_latent_size=MAX_LATENT, tp_rank=tp_rank,
                      tp_size=tp_size, tp_group=tp_group)
    spec = WeightSpec(patterns=("ema.safetensors",), key_map=llm_key_map(CFG))
    report = load_weights(module, iter_checkpoint([path]), spec, tp_rank=tp_rank,
                          tp_size=tp_size)
    assert sorted(report.ignored) == ["connector.fc1.weight",
                                      "vit_model.vision_model.post_layernorm.weight"]
    return module.eval()


@pytest.fixture(scope="module")
def ours(checkpoint: Path) -> BagelLLM:
    return load_ours(checkpoint)


def qwen3(weights: Weights, expert: str):
    """transformers' Qwen3 (QKV bias, qk-norm) holding expert `expert` ("" or "_moe_gen")."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
                         intermediate_size=CFG.intermediate_size,
                         num_hidden_layers=CFG.num_hidden_layers,
                         num_attention_heads=CFG.num_attention_heads,
                         num_key_value_heads=CFG.num_key_value_heads, head_dim=CFG.head_dim,
                         rms_norm_eps=CFG.rms_norm_eps, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": CFG.rope_theta},
                         max_position_embeddings=CFG.max_position_embeddings,
                         tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    state = {"lm_head.weight": weights["language_model.lm_head.weight"],
             "model.embed_tokens.weight": weights["language_model.model.embed_tokens.weight"],
             "model.norm.weight": weights[f"language_model.model.norm{expert}.weight"]}
    for name in model.state_dict():
        if ".layers." not in name:
            continue
        module, param = name.rsplit(".", 1)
        if module.endswith("o_proj") and param == "bias":
            state[name] = torch.zeros(CFG.hidden_size)  # BAGEL's o_proj has none
            continue
        if ".mlp." in module:
            module = module.replace(".mlp.", f".mlp{expert}.")
        else:
            module += expert
        state[name] = weights[f"language_model.{module}.{param}"]
    model.load_state_dict(state, strict=True)
    return model


def latent_embeds(w: Weights, latents: torch.Tensor, t: float, pos_ids: torch.Tensor
                  ) -> torch.Tensor:
    """BAGEL's latent input: vae2llm(x) + time_embedder(t) + latent_pos_embed(pos), the
    timestep frequencies from diffusers (DiT's convention: cos first, no shift)."""
    from diffusers.models.embeddings import get_timestep_embedding

    freq = get_timestep_embedding(torch.full((len(latents),), t), 256, flip_sin_to_cos=True,
                                  downscale_freq_shift=0)
    temb = F.linear(F.silu(F.linear(freq, w["time_embedder.mlp.0.weight"],
                                    w["time_embedder.mlp.0.bias"])),
                    w["time_embedder.mlp.2.weight"], w["time_embedder.mlp.2.bias"])
    return (F.linear(latents, w["vae2llm.weight"], w["vae2llm.bias"]) + temb
            + w["latent_pos_embed.pos_embed"][pos_ids])


# -- driving the node as the engine does ---------------------------------------------------


SPEC = KVSpec(num_layers=CFG.num_hidden_layers, num_kv_heads=CFG.num_key_value_heads,
              head_dim=CFG.head_dim, extras=kv_extras(CFG, LATENT_DIM),
              outputs={"logits": "last", "velocity": "all"})


@dataclass
class Chunk:
    """One sequence's new rows in a step: ids, positions, per-token and per-seq extras
    (absent ones take their declared default), segments, mode and wanted outputs."""

    key: SeqKey
    ids: list[int]
    positions: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    segments: list[Segment] | None = None
    mode: str = "append"
    want: tuple[str, ...] = ()


def step(module: BagelLLM, cache: KVCacheManager, chunks: list[Chunk]
         ) -> list[dict[str, torch.Tensor]]:
    """One engine step over `chunks`, ragged; each chunk's outputs (logits at its last row,
    velocity at every row)."""
    seqs, start = [], 0
    for ch in chunks:
        n = len(ch.ids)
        if not cache.has(ch.key):
            cache.create(ch.key)
        if ch.mode == "append":
            cache.reserve(ch.key, n)
        at = {"logits": (n - 1, 1), "velocity": (0, n)}
        seqs.append(SeqChunk(key=ch.key, start=start, length=n, context_len=cache.length(ch.key),
                             segments=ch.segments or [Segment(n)], mode=ch.mode,
                             outputs={name: at[name] for name in ch.want}))
        start += n
    extras = {}
    for ex in SPEC.extras:
        if any(ex.name in ch.extras for ch in chunks):
            extras[ex.name] = torch.cat([
                ch.extras[ex.name].to(ex.dtype) if ex.name in ch.extras else
                torch.full((len(ch.ids) if ex.per == "token" else 1, *ex.shape), ex.default,
                           dtype=ex.dtype) for ch in chunks])
    batch = ForwardBatch(input_ids=torch.tensor([i for ch in chunks for i in ch.ids]),
                         positions=torch.cat([ch.positions for ch in chunks]), seqs=seqs,
                         extras=extras)
    return forward_step(module, batch, cache)


def new_cache(tp_size: int = 1) -> KVCacheManager:
    """A paged cache; a TP rank's holds its share of the KV heads, as the engine sizes it."""
    spec = dataclasses.replace(SPEC, num_kv_heads=SPEC.num_kv_heads // tp_size)
    return KVCacheManager(PagePool(spec, num_pages=32, page_size=4))


def text(key: SeqKey, ids: list[int], start: int, want: tuple[str, ...] = ("logits",)) -> Chunk:
    return Chunk(key, ids, torch.arange(start, start + len(ids)), want=want)


# -- the understanding expert: Qwen3 -------------------------------------------------------


def test_text_path_matches_qwen3_over_chunked_prefill_and_decode(ours, weights):
    """Two prompts share the steps (one prefilled in two chunks); then both decode
    greedily over the cache. Every step's logits are Qwen3's on the whole sequence."""
    oracle = qwen3(weights, "")
    g = torch.Generator().manual_seed(1)
    a, b = SeqKey("a", "LLM"), SeqKey("b", "LLM")
    seq = {a: torch.randint(CFG.vocab_size, (11,), generator=g).tolist(),
           b: torch.randint(CFG.vocab_size, (5,), generator=g).tolist()}
    cache = new_cache()
    assert step(ours, cache, [text(a, seq[a][:6], 0, ())]) == [{}]
    out = step(ours, cache, [text(a, seq[a][6:], 6), text(b, seq[b], 0)])
    for i in range(4):
        for key, got in zip((a, b), out):
            with torch.no_grad():
                want = oracle(torch.tensor([seq[key]])).logits[0, -1]
            torch.testing.assert_close(got["logits"][0], want, atol=ATOL, rtol=0,
                                       msg=f"{key.request_id}: logits differ at step {i}")
            seq[key].append(int(got["logits"][0].argmax()))
        out = step(ours, cache, [text(k, seq[k][-1:], len(seq[k]) - 1) for k in (a, b)])
    assert cache.length(a) == len(seq[a]) and cache.length(b) == len(seq[b])


# -- the generation expert: Qwen3 from the *_moe_gen weights -------------------------------


def latent_chunk(key: SeqKey, latents: torch.Tensor, t: float, pos_ids: torch.Tensor,
                 positions: torch.Tensor, **kw) -> Chunk:
    n = len(latents)
    return Chunk(key, [0] * n, positions,
                 extras={"expert_ids": torch.ones(n), "latents": latents,
                         "latent_pos_ids": pos_ids, "t": torch.tensor([t])}, **kw)


def test_generation_expert_alone_is_qwen3_of_the_gen_weights(ours, weights):
    """A sequence of latent rows only, prefilled in two chunks (the second attends to the
    gen expert's cached K/V): its velocity on every row is llm2vae of Qwen3's final hidden
    (norm_moe_gen) over BAGEL's latent input embedding."""
    oracle = qwen3(weights, GEN)
    g = torch.Generator().manual_seed(2)
    n, t = 10, 0.35
    latents = torch.randn(n, LATENT_DIM, generator=g)
    pos_ids = torch.randperm(MAX_LATENT ** 2, generator=g)[:n]
    key, cache = SeqKey("g", "LLM"), new_cache()
    got = [step(ours, cache, [latent_chunk(key, latents[s], t, pos_ids[s], torch.arange(n)[s],
                                           want=("velocity",))])[0]["velocity"]
           for s in (slice(0, 6), slice(6, n))]
    with torch.no_grad():
        hidden = oracle.model(inputs_embeds=latent_embeds(weights, latents, t, pos_ids)[None]
                              ).last_hidden_state[0]
    want = F.linear(hidden, weights["llm2vae.weight"], weights["llm2vae.bias"])
    torch.testing.assert_close(torch.cat(got), want, atol=ATOL, rtol=0)


# -- a mixed step: BAGEL's routing rule ---------------------------------------------------


def _rms(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps) * weight


class DenseMoT:
    """BAGEL's MoT read plainly: every expert computes every row and row r keeps the result
    of its expert `expert[r]`; attention is over all rows a dense `mask` [T, T] allows."""

    def __init__(self, w: Weights, expert: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor):
        self.w, self.gen, self.mask = w, expert.bool(), mask
        d = CFG.head_dim
        inv = 1 / CFG.rope_theta ** (torch.arange(0, d, 2).float() / d)
        self.angle = torch.cat([positions[:, None].float() * inv] * 2, -1)[:, None]

    def by_row(self, f) -> torch.Tensor:
        a, b = f(0), f(1)
        return torch.where(self.gen.view(-1, *[1] * (a.dim() - 1)), b, a)

    def wt(self, name: str, e: int) -> torch.Tensor:
        """Expert e's tensor `name`, whose `{s}` is the expert's suffix."""
        return self.w[name.format(s=GEN if e else "")]

    def rope(self, v: torch.Tensor) -> torch.Tensor:
        v1, v2 = v.chunk(2, -1)
        return v * self.angle.cos() + torch.cat([-v2, v1], -1) * self.angle.sin()

    def heads(self, p: str, xn: torch.Tensor, name: str, count: int) -> torch.Tensor:
        """q, k or v [T, count, D] of layer `p`, q and k normed per head."""
        def f(e: int) -> torch.Tensor:
            y = F.linear(xn, self.wt(f"{p}self_attn.{name}_proj{{s}}.weight", e),
                         self.wt(f"{p}self_attn.{name}_proj{{s}}.bias", e))
            y = y.view(len(xn), count, CFG.head_dim)
            return y if name == "v" else _rms(y, self.wt(f"{p}self_attn.{name}_norm{{s}}.weight", e))
        return self.by_row(f)

    def layer(self, p: str, x: torch.Tensor) -> torch.Tensor:
        hq, hkv = CFG.num_attention_heads, CFG.num_key_value_heads
        xn = self.by_row(lambda e: _rms(x, self.wt(p + "input_layernorm{s}.weight", e)))
        q, k = self.rope(self.heads(p, xn, "q", hq)), self.rope(self.heads(p, xn, "k", hkv))
        k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, self.heads(p, xn, "v", hkv)))
        scores = torch.einsum("qhd,khd->hqk", q, k) * CFG.head_dim ** -0.5
        probs = scores.masked_fill(~self.mask, -torch.inf).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(len(x), -1)
        x = x + self.by_row(lambda e: F.linear(attn, self.wt(p + "self_attn.o_proj{s}.weight", e)))
        xn = self.by_row(lambda e: _rms(x, self.wt(p + "post_attention_layernorm{s}.weight", e)))
        return x + self.by_row(lambda e: F.linear(
            F.silu(F.linear(xn, self.wt(p + "mlp{s}.gate_proj.weight", e)))
            * F.linear(xn, self.wt(p + "mlp{s}.up_proj.weight", e)),
            self.wt(p + "mlp{s}.down_proj.weight", e)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Input embeddings [T, hidden] -> final hidden, each row normed by its expert's
        final norm."""
        for i in range(CFG.num_hidden_layers):
            x = self.layer(f"language_model.model.layers.{i}.", x)
        return self.by_row(lambda e: _rms(x, self.wt("language_model.model.norm{s}.weight", e)))


@dataclass
class Mixed:
    """A prompt of text and ViT rows, then one denoising step over it: a start marker,
    latent rows of a 2×3 grid at flow time t, an end marker."""

    ids: list[int]
    vit: torch.Tensor
    vit_embeds: torch.Tensor
    latents: torch.Tensor
    pos_ids: torch.Tensor
    marks: list[int]
    t: float = 0.7

    @classmethod
    def seeded(cls, seed: int = 3) -> Mixed:
        g = torch.Generator().manual_seed(seed)
        vit = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0])
        return cls(ids=torch.randint(CFG.vocab_size, (9,), generator=g).tolist(), vit=vit,
                   vit_embeds=torch.randn(9, CFG.hidden_size, generator=g) * vit[:, None],
                   latents=torch.randn(6, LATENT_DIM, generator=g),
                   pos_ids=torch.tensor([0, 1, 2, 8, 9, 10]),  # 2×3 cells of the 8×8 table
                   marks=torch.randint(CFG.vocab_size, (2,), generator=g).tolist())


def run_mixed(module: BagelLLM, m: Mixed, tp_size: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt appended causally in two steps (logits of each), another request's
    prompt, then the denoising step as BAGEL's `_forward_flow`: a scratch chunk, every row at
    one rope position, bidirectional over itself and attending to the whole prompt, batched
    with the other request's decode step. Returns (prompt logits [2, V], velocity [8, L])
    and checks the scratch chunk left the cache as it was."""
    key, other, cache = SeqKey("m", "LLM"), SeqKey("o", "LLM"), new_cache(tp_size)
    n_prompt = len(m.ids)
    logits = [step(module, cache, [Chunk(key, m.ids[s], torch.arange(n_prompt)[s],
                                         extras={"vit_mask": m.vit[s],
                                                 "vit_embeds": m.vit_embeds[s]},
                                         want=("logits",))])[0]["logits"][0]
              for s in (slice(0, 4), slice(4, n_prompt))]
    step(module, cache, [text(other, [5, 6, 7], 0, ())])
    n = len(m.latents) + 2
    rows = slice(1, n - 1)
    latents, pos = torch.zeros(n, LATENT_DIM), torch.zeros(n, dtype=torch.long)
    latents[rows], pos[rows] = m.latents, m.pos_ids
    scratch = Chunk(key, [m.marks[0]] + [0] * len(m.latents) + [m.marks[1]],
                    torch.full((n,), n_prompt),
                    extras={"expert_ids": torch.tensor([0] + [1] * len(m.latents) + [0]),
                            "latents": latents, "latent_pos_ids": pos, "t": torch.tensor([m.t])},
                    segments=[Segment(n, "bidirectional")], mode="scratch", want=("velocity",))
    got, _ = step(module, cache, [scratch, text(other, [8], 3)])
    assert cache.length(key) == n_prompt and cache.length(other) == 4
    return torch.stack(logits), got["velocity"]


def test_mixed_scratch_step_over_a_cached_prefix_follows_the_mot_rule(ours, weights):
    """`run_mixed`: the prompt's ViT rows take their `vit_embeds`; the denoising step's
    velocity on every row (markers included, normed by the und expert's final norm) and the
    prompt's logits equal `DenseMoT` over the whole sequence with BAGEL's mask."""
    m = Mixed.seeded()
    logits, velocity = run_mixed(ours, m)

    n_prompt, n = len(m.ids), len(m.latents) + 2
    embed = weights["language_model.model.embed_tokens.weight"]
    x = torch.cat([torch.where(m.vit[:, None].bool(), m.vit_embeds, embed[m.ids]),
                   embed[m.marks[0]][None], latent_embeds(weights, m.latents, m.t, m.pos_ids),
                   embed[m.marks[1]][None]])
    expert = torch.tensor([0] * (n_prompt + 1) + [1] * len(m.latents) + [0])
    mask = torch.ones(n_prompt + n, n_prompt + n, dtype=torch.bool)
    mask[:n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt).tril().bool()
    mask[:n_prompt, n_prompt:] = False
    positions = torch.cat([torch.arange(n_prompt), torch.full((n,), n_prompt)])
    final = DenseMoT(weights, expert, positions, mask)(x)
    want = F.linear(final[n_prompt:], weights["llm2vae.weight"], weights["llm2vae.bias"])
    torch.testing.assert_close(velocity, want, atol=ATOL, rtol=0)
    head = weights["language_model.lm_head.weight"]
    torch.testing.assert_close(logits, final[[3, n_prompt - 1]] @ head.T, atol=ATOL, rtol=0)


def _tp_rank(rank: int, checkpoint: Path, out: Path) -> None:
    """One rank of a 2-way TP group (gloo, a file rendezvous): its `run_mixed` to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=2)
    try:
        module = load_ours(checkpoint, tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
        torch.save(run_mixed(module, Mixed.seeded(), tp_size=2), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_match_one_rank(ours, checkpoint, tmp_path):
    """tp_size 2 over two real processes: each rank holds half of both experts' heads and
    MLP features (q/k/v biases sharded with them, q/k norms per whole head), and both
    ranks give the one-rank logits and velocity of the mixed step."""
    mp.spawn(_tp_rank, args=(checkpoint, tmp_path), nprocs=2, join=True)
    want = run_mixed(ours, Mixed.seeded())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, g, w in zip(("logits", "velocity"), got, want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=f"rank {rank}: {name}")


def test_a_vit_row_routed_to_the_generation_expert_is_refused(ours):
    chunk = latent_chunk(SeqKey("v", "LLM"), torch.zeros(2, LATENT_DIM), 0.5,
                         torch.tensor([0, 1]), torch.arange(2))
    chunk.extras["vit_mask"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="ViT row"):
        step(ours, new_cache(), [chunk])


# -- the real 7B layout -------------------------------------------------------------------


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_7b_layout_loads_every_parameter_once(tp_rank: int, tp_size: int) -> None:
    """BAGEL-7B-MoT's shapes on the meta device: every LLM key of the layout loads into
    one of our parameters at its full shape (each rank its shard), ViT and connector keys
    are ignored, and a renamed key is an error, not a silent skip."""
    cfg = config_from_fields(LLMConfig, {
        "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
        "layer_module": "Qwen2MoTDecoderLayer", "model_type": "qwen2"})
    assert cfg == LLMConfig() and cfg.head_dim == 128
    layout = bagel_layout(cfg, 64, 64)
    hub = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    with torch.device("meta"):
        module = BagelLLM(cfg, latent_dim=64, max_latent_size=64, tp_rank=tp_rank,
                          tp_size=tp_size)
    spec = WeightSpec(key_map=llm_key_map(cfg))
    report = load_weights(module, hub.items(), spec, tp_rank=tp_rank, tp_size=tp_size)
    assert set(report.loaded) == set(module.state_dict())
    assert len(report.loaded) == len(layout) - 2 and len(report.ignored) == 2
    if tp_size > 1:
        attn = module.model.layers[0].self_attn
        assert (attn.heads, attn.kv_heads) == (14, 2)
        assert attn.k_proj_moe_gen.bias.shape == (2 * 128,)

    broken = dict(hub)
    broken["language_model.model.layers.0.self_attn.q_norm.weight"] = broken.pop(
        "language_model.model.layers.0.self_attn.q_norm_moe_gen.weight")
    with pytest.raises(WeightLoadError) as err:
        load_weights(module, broken.items(), spec, tp_rank=tp_rank, tp_size=tp_size)
    assert err.value.missing == ["model.layers.0.self_attn.q_norm_moe_gen.weight"]
