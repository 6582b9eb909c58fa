"""Per-sequence engine state beside its pages: what was appended, for recompute and forks.

A sequence's pages can be dropped under memory pressure (preemption by recompute); its
history of appended chunks (ids, positions, segments, extras) is what rebuilds them, and
what a fork inherits up to its length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import overload

import torch

from mstar.model.forward import Segment, SeqKey


def slice_segments(segments: list[Segment], a: int, b: int) -> list[Segment]:
    """The parts of `segments` (back to back from 0) that fall in tokens [a, b)."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        lo, hi = max(a, pos), min(b, pos + seg.length)
        if lo < hi:
            out.append(Segment(hi - lo, seg.kind))
        pos += seg.length
    return out


@dataclass
class Chunk:
    """Tokens appended (or to append) to one sequence, with everything that made their K/V."""

    input_ids: torch.Tensor  # [n]
    positions: torch.Tensor  # [A, n]
    segments: list[Segment]
    token_extras: dict[str, torch.Tensor] = field(default_factory=dict)  # each [n, ...]
    seq_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Tokens in the chunk, read several times per sequence and step: kept as a plain
    #: attribute (a `functools.cached_property` takes a lock on every read in 3.11).
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = int(self.input_ids.shape[0])

    def slice(self, a: int, b: int) -> Chunk:
        return Chunk(self.input_ids[a:b], self.positions[:, a:b],
                     slice_segments(self.segments, a, b),
                     {k: v[a:b] for k, v in self.token_extras.items()}, self.seq_extras)

    @staticmethod
    def concat(chunks: list[Chunk], fill: Callable[[str, int], torch.Tensor]) -> Chunk:
        """One chunk of many; an extra some chunks lack is `fill(name, rows)` there."""
        names = {k for c in chunks for k in c.token_extras}
        return Chunk(torch.cat([c.input_ids for c in chunks]),
                     torch.cat([c.positions for c in chunks], dim=1),
                     [s for c in chunks for s in c.segments],
                     {k: torch.cat([c.token_extras[k] if k in c.token_extras
                                    else fill(k, c.length) for c in chunks]) for k in names},
                     chunks[0].seq_extras)


class SampledIds(Sequence[int]):
    """The token ids of a sequence's `sampled` (position, id) pairs, read in place: a
    step's sampling rows get them without a copy that grows with the sequence."""

    def __init__(self, pairs: list[tuple[int, int]]):
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return [tok for _, tok in self._pairs[i]]
        return self._pairs[i][1]


@dataclass
class SeqState:
    key: SeqKey
    history: list[Chunk] = field(default_factory=list)
    next_position: int = 0
    appended_ids: list[int] = field(default_factory=list)
    sampled: list[tuple[int, int]] = field(default_factory=list)  # (position, token id)
    admitted: int = -1  # admission order; -1 until it first holds pages
    needs_recompute: bool = False
    recomputing: bool = False

    @property
    def length(self) -> int:
        return len(self.appended_ids)

    def forked(self, key: SeqKey, length: int | None) -> SeqState:
        """The state of a fork sharing this sequence's first `length` tokens."""
        n = self.length if length is None else length
        history: list[Chunk] = []
        pos = 0
        for chunk in self.history:
            if pos >= n:
                break
            history.append(chunk if pos + chunk.length <= n else chunk.slice(0, n - pos))
            pos += chunk.length
        next_pos = max((int(c.positions[0].max()) + 1 for c in history if c.length), default=0)
        return SeqState(key=key, history=history, next_position=next_pos,
                        appended_ids=self.appended_ids[:n],
                        sampled=[(p, t) for p, t in self.sampled if p < n],
                        admitted=self.admitted)
