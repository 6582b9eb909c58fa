"""What a node's forward receives: ragged batches with segments, extras and named outputs.

The KV-cache engine calls a node once per step with one `ForwardBatch` holding every
scheduled sequence's new tokens back to back (no padding). `PagedAttention` layers find the
batch's attention metadata through `current_attention()`, set by the engine (or by an encoder
for a cache-less ragged batch) with `attention_context(...)`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

SegmentKind = Literal["causal", "bidirectional"]
ChunkMode = Literal["append", "scratch"]
#: Where a named output is taken: the last token of each sequence, every token, or every
#: token of the k-th segment of each sequence's chunk ("segment:k").
OutputAt = str


@dataclass(frozen=True)
class Segment:
    """A run of tokens of one chunk. A causal segment's token attends to everything before
    it and to itself; a bidirectional segment is fully connected within itself and attends to
    everything before it. A bidirectional segment is never split across engine steps."""

    length: int
    kind: SegmentKind = "causal"


@dataclass(frozen=True)
class SeqKey:
    """The unit of KV: one sequence of one request in one node under one label.
    `child` numbers the forks of a label (n completions, CEM candidates)."""

    request_id: str
    node: str
    label: str = "main"
    child: int = 0


@dataclass(frozen=True)
class ExtraSpec:
    """An extra input a node declares. `per="token"` extras are sliced in lockstep with the
    tokens (expert ids, spliced media features); `per="seq"` ones have one row per sequence
    (timestep, CFG scale). Sequences that do not supply it get `default`."""

    name: str
    per: Literal["token", "seq"]
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    default: float = 0.0


@dataclass
class SeqChunk:
    """One sequence's part of a ForwardBatch: tokens [start, start + length) of the batch.

    `context_len` tokens of this sequence are already in the cache (they are attended to but
    not recomputed). `mode="append"` keeps this chunk's K/V; `"scratch"` lets it join this
    step's attention by its segments and drops it afterwards. `is_last_chunk` is False for a
    non-final piece of a chunked prefill (its outputs are discarded or accumulated).
    """

    key: SeqKey
    start: int
    length: int
    context_len: int
    segments: list[Segment]
    mode: ChunkMode = "append"
    is_last_chunk: bool = True
    #: Outputs this sequence wants from this chunk: name -> (first row within the chunk,
    #: row count). The engine resolves the node's `last` / `all` / `segment:k` positions
    #: into these ranges (a non-final chunk of a chunked prefill wants no `last` output).
    outputs: dict[str, tuple[int, int]] = field(default_factory=dict)


class StepContext(Protocol):
    """Core services available to a node during one engine step. `device`: the engine's,
    where a node without parameters puts the tensors it makes."""

    device: torch.device

    def randn(self, seq_index: int, shape: tuple[int, ...], site: str, *,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gaussian noise for sequence/item `seq_index`, keyed by its request's
        (seed, child, site, loop iteration), the site extended by the enclosing loops'
        iterations and the join round where there are any (`rng.noise_site`): independent
        of batch composition, fresh in every outer iteration and every `Join` round."""

    def sample(self, seq_index: int, logits: torch.Tensor, site: str, step: int) -> torch.Tensor:
        """Sample token ids from `logits` [k, vocab] with the request's sampling parameters
        for `site` (`RequestPlan.sampling[site]`, else the node's), keyed by (seed, child,
        "<site>/<row>", step) (for short in-node loops: a code predictor's residual codes).
        Penalties see the ids drawn before at the same site and row for the request and
        child. Not for the rows of a sequence rebuilt after preemption (no outputs wanted:
        such a row has no invocation to key by)."""


@dataclass
class ForwardBatch:
    """Every scheduled sequence's new tokens, ragged.

    - `input_ids` [T]: token ids (placeholders where media or model embeddings go).
    - `positions` [T] or [A, T]: model-supplied positions (A axes for multi-axis RoPE).
    - `extras`: name -> tensor; per-token extras have T rows, per-seq extras B rows.
    - `seqs`: one `SeqChunk` per sequence, in batch order.
    - `ctx`: core services (noise, in-node sampling).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    seqs: list[SeqChunk]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    ctx: StepContext | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_indices(self) -> torch.Tensor:
        """Batch row of each sequence's last new token, [B]."""
        return torch.tensor([s.start + s.length - 1 for s in self.seqs], dtype=torch.long,
                            device=self.input_ids.device)

    def output_seqs(self, name: str) -> list[int]:
        """Indices (into `seqs`) of the sequences that want output `name`, in order."""
        return [i for i, s in enumerate(self.seqs) if name in s.outputs]

    def output_rows(self, name: str) -> torch.Tensor:
        """Batch rows where output `name` is taken, sequence by sequence. A node computes
        each named output only on these rows: `head(hidden[batch.output_rows("logits")])`."""
        idx: list[int] = []
        for s in self.seqs:
            if name in s.outputs:
                first, count = s.outputs[name]
                idx.extend(range(s.start + first, s.start + first + count))
        return torch.tensor(idx, dtype=torch.long, device=self.input_ids.device)

    def wants(self, name: str) -> bool:
        return any(name in s.outputs for s in self.seqs)


# ----------------------------------------------------------------------------------------
# Attention metadata: how PagedAttention layers find the cache and masks of this step.


class AttentionBackend(Protocol):
    """Computes attention for one layer of one step; `torch` is the reference backend."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] of the new tokens -> [T, H, D]. Writes the K/V of
        `append` chunks into the cache and attends over cache + new tokens by segments."""


_current: contextvars.ContextVar[AttentionBackend | None] = contextvars.ContextVar(
    "mstar_attention", default=None)


@contextlib.contextmanager
def attention_context(backend: AttentionBackend) -> Iterator[AttentionBackend]:
    """Make `backend` the attention of every PagedAttention layer run inside the block."""
    token = _current.set(backend)
    try:
        yield backend
    finally:
        _current.reset(token)


def current_attention() -> AttentionBackend:
    backend = _current.get()
    if backend is None:
        raise RuntimeError("PagedAttention called outside an attention_context: the engine "
                           "(or the encoder's ragged helper) must set one")
    return backend
