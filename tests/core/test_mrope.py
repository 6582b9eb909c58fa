"""Interleaved multimodal RoPE (`RotaryEmbedding(sections=..., interleaved=True)`) against
Qwen3-Omni's Thinker rotary (transformers), and its meta-device build."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeTextConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerTextRotaryEmbedding,
    apply_rotary_pos_emb,
)

from mstar.model.layers import RotaryEmbedding
from mstar.weights import materialize

ATOL = 1e-5


@pytest.mark.parametrize(("head_dim", "sections"), [(128, (24, 20, 20)), (16, (4, 2, 2))])
def test_interleaved_mrope_matches_qwen3_omni(head_dim: int, sections: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base, tokens = 1_000_000.0, 7
    ours = RotaryEmbedding(head_dim, base, sections=sections, interleaved=True)
    config = Qwen3OmniMoeTextConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": base,
                         "mrope_section": list(sections), "interleaved": True})
    hf = Qwen3OmniMoeThinkerTextRotaryEmbedding(config)
    # Three different axes, as for an image's patches.
    positions = torch.stack([torch.randint(0, 3000, (tokens,)) for _ in range(3)])
    q, k = torch.randn(tokens, 4, head_dim), torch.randn(tokens, 2, head_dim)

    cos, sin = hf(q, positions[:, None, :])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ours, k_ours = ours(positions, q, k)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), atol=ATOL, rtol=1e-5)
    # The interleaved layout is not the chunked one, and equal axes are 1-D RoPE.
    chunked = RotaryEmbedding(head_dim, base, sections=sections)
    assert not torch.allclose(q_ours, chunked(positions, q, k)[0], atol=1e-3)
    flat = positions[0]
    assert torch.equal(ours(flat.expand(3, -1), q, k)[0], ours(flat, q, k)[0])


def test_interleaved_mrope_built_on_meta_equals_cpu_build() -> None:
    def build() -> RotaryEmbedding:
        return RotaryEmbedding(128, 1_000_000.0, sections=(24, 20, 20), interleaved=True)

    with torch.device("meta"):
        meta = build()
    materialize(meta, torch.device("cpu"), torch.float32, load=lambda module: [])
    cpu = build()
    assert torch.equal(meta.inv_freq, cpu.inv_freq)
    assert torch.equal(meta.axis_of_freq, cpu.axis_of_freq)
    assert cpu.axis_of_freq[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert cpu.axis_of_freq.bincount().tolist() == [24, 20, 20]


def test_interleaved_mrope_rejects_sections_that_do_not_interleave() -> None:
    with pytest.raises(ValueError, match="interleaved rotary"):
        RotaryEmbedding(16, sections=(2, 3, 3), interleaved=True)
    with pytest.raises(ValueError, match="interleaved rotary"):
        RotaryEmbedding(16, interleaved=True)
