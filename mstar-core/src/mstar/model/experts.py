"""Routing the rows of a ragged batch between the two experts of a mixture-of-transformers
LLM (BAGEL's understanding/generation experts, a VLA's language/action experts).

Each expert runs its own norms, projections and MLP on its own rows while attention stays
joint over all rows, so a layer gathers each expert's rows into a compact tensor, runs the
expert on it, and scatters the results back into batch order for attention.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ExpertRouting:
    """Which batch rows belong to which expert (0 or 1, from a per-token `expert_ids`
    tensor), and moving rows between the batch order and each expert's own (compact)
    order. When one expert owns every row (plain text, a pure latent or action chunk) no
    gather or scatter is done."""

    def __init__(self, expert_ids: torch.Tensor):
        self.expert_ids = expert_ids
        self.num_tokens = int(expert_ids.shape[0])
        first = int(expert_ids[0]) if self.num_tokens else 0
        #: The expert owning every row, if one does: its order is the batch order.
        self.single = first if first in (0, 1) and bool((expert_ids == first).all()) else None
        if self.single is not None:
            every = torch.arange(self.num_tokens, device=expert_ids.device)
            self.rows = [every[:0], every[:0]]
            self.rows[first] = every
            self.counts = [0, 0]
            self.counts[first] = self.num_tokens
            return
        bad = (expert_ids != 0) & (expert_ids != 1)
        if bool(bad.any()):
            raise ValueError(f"expert_ids must be 0 or 1, got {expert_ids[bad].unique().tolist()}")
        self.rows = [torch.nonzero(expert_ids == e).squeeze(1) for e in (0, 1)]
        self.counts = [int(r.shape[0]) for r in self.rows]
        self.local_index = torch.zeros_like(expert_ids)
        for rows in self.rows:
            self.local_index[rows] = torch.arange(rows.shape[0], device=rows.device)

    def present(self) -> list[int]:
        """The experts owning at least one row."""
        return [e for e in (0, 1) if self.counts[e]]

    def gather(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert `e`'s rows of a batch-ordered tensor."""
        return x if self.counts[e] == self.num_tokens else x[self.rows[e]]

    def scatter(self, parts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Batch-ordered [T, ...] from each present expert's rows."""
        if len(parts) == 1:
            return next(iter(parts.values()))
        first = next(iter(parts.values()))
        out = first.new_empty((self.num_tokens, *first.shape[1:]))
        for e, part in parts.items():
            out[self.rows[e]] = part
        return out

    def local(self, batch_rows: torch.Tensor, e: int, output: str) -> torch.Tensor:
        """Positions in expert `e`'s order of `batch_rows`, which must all be expert `e`'s."""
        if self.single == e:
            return batch_rows
        wrong = self.expert_ids[batch_rows] != e
        if bool(wrong.any()):
            raise ValueError(f"output {output!r} is computed by expert {e}, but batch rows "
                             f"{batch_rows[wrong].tolist()} are routed to another expert")
        return self.local_index[batch_rows]
