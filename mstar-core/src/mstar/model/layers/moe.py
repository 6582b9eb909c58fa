"""Sparse mixture-of-experts MLP (Qwen-MoE family): a router picks `top_k` of `num_experts`
gated MLPs per token, plus an optional always-on shared expert, tensor-parallel.

Each expert is a `GatedMLP` (gate/up column-parallel, down row-parallel over the expert's
intermediate features), so every rank holds a slice of every expert and the layer needs one
all-reduce, after the weighted sum, not one per expert. The router is replicated: every rank
routes the same tokens the same way. Parameter names are the checkpoints' per-expert ones
(`gate.weight`, `experts.{e}.{gate,up,down}_proj.weight`, `shared_expert.*`,
`shared_expert_gate.weight`), so the loader needs no renaming.

Only the experts that received tokens run, each on the compact batch of its tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.layers.mlp import GatedMLP
from mstar.model.parallel import all_reduce


class SparseMoE(nn.Module):
    """x [T, H] -> [T, H]: Σ over the token's top-k experts of weight · expert(x), plus
    sigmoid(shared_expert_gate(x)) · shared_expert(x) when a shared expert is configured.

    Router weights are a softmax over all experts in float32, cut to the top k and, with
    `norm_topk_prob`, renormalised to sum to 1.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int,
                 top_k: int, *, norm_topk_prob: bool, shared_expert_intermediate_size: int = 0,
                 act: str = "silu", tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.tp_size, self.tp_group = tp_size, tp_group
        tp = dict(act=act, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, dtype=dtype)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts = nn.ModuleList(
            GatedMLP(hidden_size, moe_intermediate_size, **tp) for _ in range(num_experts))
        if shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size, **tp)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k]) of every token."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's summand of the output (no collective)."""
        weights, ids = self.route(x)
        flat = ids.reshape(-1)
        # Sort the (token, slot) pairs by expert: each expert's tokens are one contiguous run.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = (order // self.top_k).split(counts)
        slot_weights = weights.reshape(-1)[order].split(counts)
        out = torch.zeros_like(x)
        for expert, rows, w in zip(self.experts, tokens, slot_weights):
            if rows.numel():
                out.index_add_(0, rows, expert.local_forward(x[rows]) * w[:, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.local_forward(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local_forward(x), self.tp_size, self.tp_group)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"norm_topk_prob={self.norm_topk_prob}")
