"""`SparseMoE` against Qwen3-Omni's Thinker and Talker MoE blocks (transformers), loaded
through the real loader from the hub's per-expert layout, and its TP shards against TP=1.

transformers holds the experts fused in memory (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); the checkpoint files, and our layer, hold one 2-D tensor
per expert and projection. The test converts the HF block's state dict to that layout the
way the hub stores it (gate rows first in `gate_up_proj`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerTextConfig,
    Qwen3OmniMoeTextConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerTextSparseMoeBlock,
    Qwen3OmniMoeThinkerTextSparseMoeBlock,
)

from mstar.model.layers import SparseMoE
from mstar.weights import WeightSpec, iter_checkpoint, load_weights

HIDDEN, INTER, EXPERTS, TOP_K, SHARED = 16, 8, 6, 2, 12
ATOL = 1e-5


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors -> the hub's per-expert 2-D tensors."""
    out = {}
    for key, value in state.items():
        if key == "experts.gate_up_proj":
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in value):
                out[f"experts.{e}.gate_proj.weight"] = gate
                out[f"experts.{e}.up_proj.weight"] = up
        elif key == "experts.down_proj":
            for e, down in enumerate(value):
                out[f"experts.{e}.down_proj.weight"] = down
        else:
            out[key] = value
    return {k: v.detach().contiguous() for k, v in out.items()}


def _hf_block(shared: bool, norm_topk_prob: bool) -> nn.Module:
    fields = dict(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS,
                  num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob, hidden_act="silu")
    if shared:
        block = Qwen3OmniMoeTalkerTextSparseMoeBlock(Qwen3OmniMoeTalkerTextConfig(
            shared_expert_intermediate_size=SHARED, **fields))
    else:
        block = Qwen3OmniMoeThinkerTextSparseMoeBlock(Qwen3OmniMoeTextConfig(**fields))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block.eval()


def _ours(shared: bool, norm_topk_prob: bool, **tp) -> SparseMoE:
    return SparseMoE(HIDDEN, INTER, EXPERTS, TOP_K, norm_topk_prob=norm_topk_prob,
                     shared_expert_intermediate_size=SHARED if shared else 0, **tp)


def _load(path, build: Callable[..., SparseMoE], tp_rank: int = 0,
          tp_size: int = 1) -> SparseMoE:
    module = build(tp_rank=tp_rank, tp_size=tp_size)
    report = load_weights(module, iter_checkpoint([path]), WeightSpec(), tp_rank=tp_rank,
                          tp_size=tp_size)
    assert sorted(report.loaded) == sorted(module.state_dict())
    return module


@pytest.mark.parametrize("shared", [False, True], ids=["thinker", "talker"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sparse_moe_matches_qwen3_omni_blocks(tmp_path, shared: bool,
                                              norm_topk_prob: bool) -> None:
    torch.manual_seed(0)
    hf = _hf_block(shared, norm_topk_prob)
    path = tmp_path / "moe.safetensors"
    save_file(hub_layout(hf.state_dict()), str(path))
    ours = _load(path, lambda **tp: _ours(shared, norm_topk_prob, **tp))

    x = torch.randn(11, HIDDEN)
    with torch.no_grad():
        expected = hf(x[None])[0]
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    # Enough tokens that several experts run, and the routing is not degenerate.
    assert len(ours.route(x)[1].unique()) > TOP_K


def test_sparse_moe_handles_an_empty_batch() -> None:
    moe = _ours(True, True)
    assert moe(torch.zeros(0, HIDDEN)).shape == (0, HIDDEN)


@pytest.mark.parametrize("shared", [False, True], ids=["thinker", "talker"])
def test_sparse_moe_shards_sum_to_full(tmp_path, shared: bool) -> None:
    """Every rank routes identically (replicated router) and holds half of each expert's
    intermediate features: the ranks' summands add up to the TP=1 output."""
    torch.manual_seed(0)
    path = tmp_path / "moe.safetensors"
    save_file(hub_layout(_hf_block(shared, True).state_dict()), str(path))

    def build(**tp):
        return _ours(shared, True, **tp)

    full = _load(path, build)
    shards = [_load(path, build, rank, 2) for rank in range(2)]
    assert shards[1].experts[3].gate_proj.weight.shape == (INTER // 2, HIDDEN)
    assert shards[1].experts[3].down_proj.weight.shape == (HIDDEN, INTER // 2)
    assert shards[1].gate.weight.shape == (EXPERTS, HIDDEN)
    x = torch.randn(9, HIDDEN)
    with torch.no_grad():
        y = sum(s.local_forward(x) for s in shards)
        torch.testing.assert_close(y, full(x), atol=ATOL, rtol=1e-5)


def test_sparse_moe_rejects_bad_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        SparseMoE(HIDDEN, INTER, 4, 5, norm_topk_prob=True)
