"""Tensor-parallel linear, embedding and LM-head layers (Megatron-style), plain at tp_size 1.

Parameter names are Hugging Face's (`weight`, `bias`) so checkpoint keys map 1:1; each
parameter is marked with how it is sharded (`mstar.model.parallel.mark_sharded`) and the
shared loader slices it. Every layer has `local_forward`: this rank's part of the output
with no collective (a slice of the last dim for column-parallel layers, a summand for
row-parallel and embedding layers). `forward` adds the collective, and at tp_size > 1 it
requires a real `tp_group`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.parallel import (
    all_gather_last_dim,
    all_reduce,
    check_tp,
    mark_sharded,
    shard_size,
)


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what}={n} is not divisible by tp_size={tp_size}")
    return n // tp_size


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split over ranks: weight [out/tp, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
                 gather_output: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.gather_output = gather_output
        local_out = _divide(out_features, tp_size, "out_features")
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype))
        mark_sharded(self.weight, 0, out_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, dtype=dtype))
            mark_sharded(self.bias, 0, out_features)
        else:
            self.register_parameter("bias", None)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the output, [..., out/tp]."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x)
        if self.gather_output:
            y = all_gather_last_dim(y, self.tp_size, self.tp_group)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input columns split over ranks: weight [out, in/tp].

    Each rank multiplies its slice of the input; the all-reduce sums the partial products.
    The (replicated) bias is added by rank 0 only, so it is counted once in the sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
                 input_is_parallel: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.input_is_parallel = input_is_parallel
        self.local_in = _divide(in_features, tp_size, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype))
        mark_sharded(self.weight, 1, in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype))
            mark_sharded(self.bias, None)
        else:
            self.register_parameter("bias", None)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's summand of the output, [..., out]. `x` is this rank's input slice
        (or the full input when `input_is_parallel` is False)."""
        if not self.input_is_parallel and self.tp_size > 1:
            start = self.tp_rank * self.local_in
            x = x[..., start:start + self.local_in]
        bias = self.bias if self.tp_rank == 0 else None
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local_forward(x), self.tp_size, self.tp_group)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with vocabulary rows split over ranks: weight [ceil(V/tp), dim].

    A vocabulary not divisible by tp_size is padded: the last rank's extra rows are zeros
    (the loader pads them) and no token id reaches them. Ids outside a rank's range give
    zero rows, so the all-reduce sum is the full lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_rank: int = 0,
                 tp_size: int = 1, tp_group: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        rows = shard_size(num_embeddings, tp_size)
        self.vocab_start = tp_rank * rows
        self.vocab_end = min(self.vocab_start + rows, num_embeddings)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype))
        mark_sharded(self.weight, 0, num_embeddings)

    def local_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's summand: embeddings of the ids in its range, zeros elsewhere."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        return F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local_forward(input_ids), self.tp_size, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"tp={self.tp_rank}/{self.tp_size}, rows=[{self.vocab_start}, {self.vocab_end})")


class ParallelLMHead(nn.Module):
    """Logits over the vocabulary, split over ranks like `VocabParallelEmbedding` and
    all-gathered. `tied_to` shares that embedding's weight (same Parameter, so a checkpoint
    that stores only the embedding loads both)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, *,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
                 tied_to: VocabParallelEmbedding | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        rows = shard_size(num_embeddings, tp_size)
        self.vocab_start = tp_rank * rows
        self.vocab_end = min(self.vocab_start + rows, num_embeddings)
        if tied_to is not None:
            layout = (tied_to.num_embeddings, tied_to.embedding_dim, tied_to.tp_rank,
                      tied_to.tp_size)
            if layout != (num_embeddings, embedding_dim, tp_rank, tp_size):
                raise ValueError(f"tied_to embedding has (vocab, dim, tp_rank, tp_size) {layout}, "
                                 f"the head {(num_embeddings, embedding_dim, tp_rank, tp_size)}")
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype))
            mark_sharded(self.weight, 0, num_embeddings)
        if bias:
            self.bias = nn.Parameter(torch.empty(rows, dtype=dtype))
            mark_sharded(self.bias, 0, num_embeddings)
        else:
            self.register_parameter("bias", None)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary range [vocab_start, vocab_end) (padding cut)."""
        return F.linear(x, self.weight, self.bias)[..., :self.vocab_end - self.vocab_start]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        padded = all_gather_last_dim(F.linear(x, self.weight, self.bias), self.tp_size,
                                     self.tp_group)
        return padded[..., :self.num_embeddings]

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}")
