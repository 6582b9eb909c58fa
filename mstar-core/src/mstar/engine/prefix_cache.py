"""Prefix caching: content hashes of full KV pages, and the table of pages kept for reuse.

A page's K/V are a function of everything before it and everything in it: the node and its
weights, the KV label and dtype, and per token the id, the positions on every axis, the
token-level extras (spliced media rows, expert ids, ...), plus the sequence-level extras and
which tokens form bidirectional segments (a bidirectional token sees its whole segment, so
its K/V depend on where that segment ends). `page_hashes` folds all of it into one hash per
full page, chained from the previous page's, so equal hashes mean equal K/V and a page can
be shared by every sequence whose prompt starts the same way. Causal segment boundaries are
left out on purpose: a causal token attends to everything before it whatever segment it is
in, so `[(8, causal), (8, causal)]` and `[(16, causal)]` give the same K/V.

`PrefixTable` maps hashes to pages. A hashed page is immutable (the cache copies it before
any write). When its last holder frees it the page stays cached, idle, in LRU order, and is
evicted (its hash dropped) only when the allocator runs out of never-cached free pages.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy
import torch

from mstar.model.forward import Segment


def _bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a CPU tensor (any dtype, bfloat16 included)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _row_bytes(t: torch.Tensor) -> numpy.ndarray:
    """`t` [n, ...] (any dtype, bfloat16 included) as its raw bytes, one row per token:
    a page's bytes are then a slice (one conversion per chunk: torch calls per page would
    each hand the GIL to the threads serving clients)."""
    t = t.detach().cpu().contiguous()
    if not t.numel():
        return numpy.zeros((t.shape[0], 0), dtype=numpy.uint8)
    return t.view(torch.uint8).numpy().reshape(t.shape[0], -1)


def page_hashes(input_ids: torch.Tensor, positions: torch.Tensor, segments: Sequence[Segment],
                token_extras: Mapping[str, torch.Tensor], seq_extras: Mapping[str, torch.Tensor],
                *, page_size: int, salt: str) -> list[bytes]:
    """One chained hash per *full* page of a chunk that starts a sequence (token 0 first).

    `positions` is [A, n]; `token_extras` [n, ...] and `seq_extras` are every extra the
    forward sees (defaults filled in, so a missing extra and its default hash the same way);
    `salt` names what is fixed per cache: node, label, KV dtype.
    """
    n = int(input_ids.shape[0])
    pages = n // page_size
    if pages == 0:
        return []
    ids = _row_bytes(input_ids.to(torch.long))
    pos = positions.detach().to("cpu", torch.long).numpy()  # [A, n]: a page is [:, a:b]
    rows = {name: (t.dtype, _row_bytes(t)) for name, t in sorted(token_extras.items())}
    root = hashlib.blake2b(salt.encode(), digest_size=16)
    for name, t in sorted(seq_extras.items()):
        root.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        root.update(_bytes(t.detach().cpu()))
    bidirectional: list[tuple[int, int]] = []
    start = 0
    for seg in segments:
        if seg.kind == "bidirectional":
            bidirectional.append((start, start + seg.length))
        start += seg.length
    out: list[bytes] = []
    prev = root.digest()
    for p in range(pages):
        a, b = p * page_size, (p + 1) * page_size
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(ids[a:b].tobytes())
        h.update(pos[:, a:b].tobytes())
        for name, (dtype, data) in rows.items():
            h.update(f"{name}:{dtype}".encode())
            h.update(data[a:b].tobytes())
        for s, e in bidirectional:
            if s < b and e > a:
                h.update(f"bidi:{s}:{e}".encode())
        prev = h.digest()
        out.append(prev)
    return out


def reusable_length(matched_tokens: int, segments: Sequence[Segment], limit: int,
                    page_size: int) -> int:
    """How many leading tokens of a chunk may come from cached pages: at most
    `matched_tokens` (the cached run) and `limit` (the first token whose outputs are
    wanted: at least the last token is always run), whole pages only, and never ending
    strictly inside a bidirectional segment (such a segment is reused whole or not at all)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for seg in segments:
        if seg.kind == "bidirectional":
            spans.append((start, start + seg.length))
        start += seg.length
    n = max(0, min(matched_tokens, limit))
    while True:
        cut = n
        for s, e in spans:
            if s < cut < e:
                cut = s
        cut -= cut % page_size
        if cut == n:
            return n
        n = cut


class PrefixTable:
    """Hash <-> page for the pages of one pool whose K/V are final, and the LRU of those no
    sequence holds (refcount 0): they are free for the allocator, but reusable until it
    takes them."""

    def __init__(self) -> None:
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # least recently released first

    def __len__(self) -> int:
        return len(self._page_of)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def lookup(self, h: bytes) -> int | None:
        return self._page_of.get(h)

    def is_hashed(self, page: int) -> bool:
        return page in self._hash_of

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def register(self, page: int, h: bytes) -> bool:
        """Cache `page` under `h`; False (nothing done) when either is already known (two
        sequences that computed the same prefix concurrently: the first one wins)."""
        if h in self._page_of or page in self._hash_of:
            return False
        self._page_of[h] = page
        self._hash_of[page] = h
        return True

    def release(self, page: int) -> bool:
        """The last holder let go of `page`: keep it cached (True) if it has a hash."""
        if page not in self._hash_of:
            return False
        self._idle[page] = None
        return True

    def revive(self, page: int) -> None:
        """An idle cached page is held again."""
        del self._idle[page]

    def evict(self, page: int | None = None) -> int:
        """The least recently released idle page (or the idle `page` given: a
        tensor-parallel follower evicts what its leader evicted), its hash dropped."""
        if page is None:
            page = next(iter(self._idle))
        del self._idle[page]
        del self._page_of[self._hash_of.pop(page)]
        return page
