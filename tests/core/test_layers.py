"""Shared layers against Hugging Face's implementations, and TP shards against full layers.

The TP tests run in one process: a full (tp_size 1) layer's weights are saved as a
safetensors file, each rank's shard is loaded from it with the real loader, every shard's
`local_forward` runs on the same input, and the pieces are recombined by hand (concatenated
for column-parallel layers, summed for row-parallel and embedding layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from mstar.model.forward import attention_context
from mstar.model.layers import (
    ColumnParallelLinear,
    GatedMLP,
    PagedAttention,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from mstar.weights import WeightSpec, iter_checkpoint, load_weights

ATOL = 1e-5


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


# -- norms -----------------------------------------------------------------------------------


def test_rms_norm_matches_llama_and_gemma() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    ours, hf = RMSNorm(32, eps=1e-5), LlamaRMSNorm(32, eps=1e-5)
    _randomize(ours)
    hf.weight.data.copy_(ours.weight)
    torch.testing.assert_close(ours(x), hf(x), atol=ATOL, rtol=0)

    gemma, hf_gemma = RMSNorm(32, offset=1.0), GemmaRMSNorm(32, eps=1e-6)
    _randomize(gemma)
    hf_gemma.weight.data.copy_(gemma.weight)
    torch.testing.assert_close(gemma(x), hf_gemma(x), atol=ATOL, rtol=0)


def test_rms_norm_starts_as_identity_scale_and_keeps_dtype() -> None:
    x = torch.randn(3, 8).to(torch.bfloat16)
    for offset in (0.0, 1.0):
        y = RMSNorm(8, offset=offset)(x)
        assert y.dtype == torch.bfloat16
        ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(y, ref.to(torch.bfloat16))


# -- rotary ----------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
def test_rotary_matches_hf_llama(scaling: dict | None) -> None:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, base, tokens = 4, 2, 32, 500000.0, 7
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         rope_parameters={"rope_type": "default", "rope_theta": base,
                                          **(scaling or {})})
    hf = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(head_dim, base, rope_scaling=scaling)
    if scaling is not None:
        assert not torch.allclose(ours.inv_freq, RotaryEmbedding(head_dim, base).inv_freq)

    positions = torch.randint(0, 20000, (tokens,))
    q, k = torch.randn(tokens, heads, head_dim), torch.randn(tokens, kv_heads, head_dim)
    cos, sin = hf(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ours, k_ours = ours(positions, q, k)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), atol=ATOL, rtol=0)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), atol=ATOL, rtol=0)


def test_multi_axis_rotary_with_equal_axes_is_1d_rotary() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, sections=(2, 3, 3))
    positions = torch.randint(0, 1000, (6,))
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    q1, k1 = rope(positions, q, k)
    q3, k3 = rope(positions.expand(3, -1), q, k)
    assert torch.equal(q1, q3) and torch.equal(k1, k3)


def _hand_rotary(x: torch.Tensor, positions: torch.Tensor, sections: tuple[int, ...],
                 base: float) -> torch.Tensor:
    """Pair (j, j + D/2) of every head rotated by angle pos[axis(j)] * base^(-2j/D)."""
    tokens, heads, dim = x.shape
    half = dim // 2
    axis_of = [a for a, n in enumerate(sections) for _ in range(n)]
    out = torch.empty(tokens, heads, dim, dtype=torch.float64)
    xd = x.double()
    for t in range(tokens):
        for j in range(half):
            angle = float(positions[axis_of[j], t]) * base ** (-2 * j / dim)
            c, s = math.cos(angle), math.sin(angle)
            out[t, :, j] = xd[t, :, j] * c - xd[t, :, j + half] * s
            out[t, :, j + half] = xd[t, :, j + half] * c + xd[t, :, j] * s
    return out.float()


def test_multi_axis_rotary_matches_hand_computation_and_qwen2_vl() -> None:
    torch.manual_seed(0)
    sections, head_dim, base, tokens = (2, 3, 3), 16, 10000.0, 5
    rope = RotaryEmbedding(head_dim, base, sections=sections)
    positions = torch.stack([torch.arange(tokens), torch.arange(tokens) * 3 % 7,
                             torch.arange(tokens) + 20])
    q, k = torch.randn(tokens, 4, head_dim), torch.randn(tokens, 2, head_dim)
    q_ours, k_ours = rope(positions, q, k)

    torch.testing.assert_close(q_ours, _hand_rotary(q, positions, sections, base),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(k_ours, _hand_rotary(k, positions, sections, base),
                               atol=ATOL, rtol=0)
    assert not torch.allclose(q_ours, rope(positions[0], q, k)[0], atol=1e-3)

    config = Qwen2VLTextConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                               rope_parameters={"rope_type": "default", "rope_theta": base,
                                                "mrope_section": list(sections)})
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions[:, None, :])
    q_hf, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), atol=ATOL, rtol=0)


def test_rotary_rejects_bad_sections_and_scaling() -> None:
    with pytest.raises(ValueError, match="sum to head_dim/2"):
        RotaryEmbedding(16, sections=(2, 2))
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        RotaryEmbedding(16, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="A = len"):
        RotaryEmbedding(16)(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 1, 16),
                            torch.zeros(2, 1, 16))


# -- MLP -------------------------------------------------------------------------------------


def test_gated_mlp_matches_llama_and_gemma_mlp() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    hf = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu"))
    ours = GatedMLP(32, 48)
    ours.load_state_dict(hf.state_dict())
    torch.testing.assert_close(ours(x), hf(x), atol=ATOL, rtol=0)

    hf_gemma = GemmaMLP(GemmaConfig(hidden_size=32, intermediate_size=48, head_dim=8,
                                    hidden_activation="gelu_pytorch_tanh"))
    gemma = GatedMLP(32, 48, act="gelu_tanh")
    gemma.load_state_dict(hf_gemma.state_dict())
    torch.testing.assert_close(gemma(x), hf_gemma(x), atol=ATOL, rtol=0)


# -- paged attention -------------------------------------------------------------------------


class _DenseCausalAttention:
    """A cache-less causal attention backend over one sequence (SDPA with GQA)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        self.calls.append((layer_idx, scale))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True, scale=scale,
                                             enable_gqa=True)
        return out.transpose(0, 1)


def test_paged_attention_uses_the_current_backend() -> None:
    torch.manual_seed(0)
    attn = PagedAttention(3, num_heads=4, num_kv_heads=2, head_dim=16)
    q, k, v = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    with pytest.raises(RuntimeError, match="attention_context"):
        attn(q, k, v)
    backend = _DenseCausalAttention()
    with attention_context(backend):
        out = attn(q, k, v)
    assert backend.calls == [(3, 16 ** -0.5)]
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("thd,shd->hts", q, kk) / 4.0
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    ref = torch.einsum("hts,shd->thd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# -- tensor parallelism in one process ---------------------------------------------------------


def _load_shards(full: nn.Module, build: Callable[..., nn.Module], tmp_path,
                 tp_size: int = 2) -> list[nn.Module]:
    """Save `full`'s weights, load each rank's shard of them with the real loader."""
    path = tmp_path / "full.safetensors"
    save_file({k: v.detach().contiguous() for k, v in full.state_dict().items()}, str(path))
    shards = []
    for rank in range(tp_size):
        shard = build(tp_rank=rank, tp_size=tp_size)
        load_weights(shard, iter_checkpoint([path]), WeightSpec(), tp_rank=rank, tp_size=tp_size)
        shards.append(shard)
    return shards


def test_column_parallel_shards_concatenate_to_full(tmp_path) -> None:
    torch.manual_seed(0)
    full = _randomize(ColumnParallelLinear(8, 12, bias=True))
    shards = _load_shards(full, lambda **tp: ColumnParallelLinear(8, 12, bias=True, **tp),
                          tmp_path)
    assert shards[0].weight.shape == (6, 8) and shards[0].weight.tp_shard_dim == 0
    x = torch.randn(4, 8)
    y = torch.cat([s.local_forward(x) for s in shards], dim=-1)
    torch.testing.assert_close(y, full(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(full(x), F.linear(x, full.weight, full.bias))


@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_shards_sum_to_full(tmp_path, input_is_parallel: bool) -> None:
    torch.manual_seed(0)
    full = _randomize(RowParallelLinear(8, 6, bias=True))

    def build(**tp):
        return RowParallelLinear(8, 6, bias=True, input_is_parallel=input_is_parallel, **tp)

    shards = _load_shards(full, build, tmp_path)
    assert shards[1].weight.shape == (6, 4) and shards[1].bias.tp_shard_dim is None
    x = torch.randn(4, 8)
    pieces = x.chunk(2, dim=-1) if input_is_parallel else (x, x)
    y = sum(s.local_forward(p) for s, p in zip(shards, pieces))
    torch.testing.assert_close(y, full(x), atol=ATOL, rtol=0)


def test_vocab_parallel_embedding_pads_and_sums_to_full(tmp_path) -> None:
    torch.manual_seed(0)
    full = _randomize(VocabParallelEmbedding(11, 8))
    shards = _load_shards(full, lambda **tp: VocabParallelEmbedding(11, 8, **tp), tmp_path)
    assert shards[1].weight.shape == (6, 8)
    assert torch.equal(shards[1].weight[5], torch.zeros(8))  # padding row of vocab 11 / 2
    ids = torch.tensor([0, 5, 6, 10, 3, 10])
    y = sum(s.local_forward(ids) for s in shards)
    torch.testing.assert_close(y, full(ids), atol=ATOL, rtol=0)


def test_lm_head_shards_concatenate_to_full_logits(tmp_path) -> None:
    torch.manual_seed(0)
    full = _randomize(ParallelLMHead(11, 8))
    shards = _load_shards(full, lambda **tp: ParallelLMHead(11, 8, **tp), tmp_path)
    x = torch.randn(3, 8)
    logits = torch.cat([s.local_forward(x) for s in shards], dim=-1)
    assert logits.shape == (3, 11)
    torch.testing.assert_close(logits, full(x), atol=ATOL, rtol=0)


def test_tied_lm_head_loads_from_the_embedding_alone(tmp_path) -> None:
    torch.manual_seed(0)
    table = torch.randn(11, 8)
    path = tmp_path / "tied.safetensors"
    save_file({"embed.weight": table}, str(path))

    class Tied(nn.Module):
        def __init__(self, tp_rank: int, tp_size: int):
            super().__init__()
            self.embed = VocabParallelEmbedding(11, 8, tp_rank=tp_rank, tp_size=tp_size)
            self.head = ParallelLMHead(11, 8, tp_rank=tp_rank, tp_size=tp_size,
                                       tied_to=self.embed)

    x = torch.randn(3, 8)
    shards = [Tied(r, 2) for r in range(2)]
    for r, shard in enumerate(shards):
        report = load_weights(shard, iter_checkpoint([path]), WeightSpec(), tp_rank=r,
                              tp_size=2)
        assert report.loaded == ["embed.weight", "head.weight"]
    logits = torch.cat([s.head.local_forward(x) for s in shards], dim=-1)
    torch.testing.assert_close(logits, x @ table.T, atol=ATOL, rtol=0)


def test_gated_mlp_shards_sum_to_full(tmp_path) -> None:
    torch.manual_seed(0)
    full = _randomize(GatedMLP(8, 12, bias=True))
    shards = _load_shards(full, lambda **tp: GatedMLP(8, 12, bias=True, **tp), tmp_path)
    assert shards[0].gate_proj.weight.shape == (6, 8)
    assert shards[0].down_proj.weight.shape == (8, 6)
    x = torch.randn(4, 8)
    y = sum(s.local_forward(x) for s in shards)
    torch.testing.assert_close(y, full(x), atol=ATOL, rtol=0)


def test_collectives_without_a_group_refuse_instead_of_returning_a_part() -> None:
    x = torch.randn(2, 8)
    for layer, inp in [(RowParallelLinear(8, 4, tp_rank=0, tp_size=2), x[:, :4]),
                       (ColumnParallelLinear(8, 4, tp_rank=0, tp_size=2, gather_output=True), x),
                       (VocabParallelEmbedding(10, 8, tp_rank=1, tp_size=2), torch.tensor([1])),
                       (ParallelLMHead(10, 8, tp_rank=0, tp_size=2), x)]:
        with pytest.raises(RuntimeError, match="needs a tp_group"):
            layer(inp)


def test_layers_reject_indivisible_or_invalid_tp() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(8, 5, tp_size=2)
    with pytest.raises(ValueError, match="not divisible"):
        RowParallelLinear(5, 8, tp_size=2)
    with pytest.raises(ValueError, match="invalid tensor-parallel"):
        GatedMLP(8, 8, tp_rank=2, tp_size=2)
