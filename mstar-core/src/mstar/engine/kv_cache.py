"""The paged KV cache: a page pool per KV node and the sequences that live in it.

A sequence (`SeqKey`: request, node, label, child) owns a page table of fixed-size pages.
Pages are reference-counted so that `fork` can share a prefix between sequences (CFG
branches, `n` completions, CEM candidates) without copying; a shared page is copied only
when one side is about to write into it (copy-on-write, done by `reserve`). Reserving is
separate from committing: the engine reserves room before a step, the attention backend
writes K/V into the reserved slots, and the engine commits the tokens after the step, so a
failed or scratch step never changes a sequence's length.

`export`/`import_sequence` turn a sequence into one contiguous tensor and back: this is how
KV migrates between workers and how a fork reaches a label placed on another rank.

Prefix caching (`mstar.engine.prefix_cache`): full pages whose K/V are final may be
`register`ed under a content hash; a new sequence `adopt`s the longest cached run of its
prompt's pages instead of recomputing them. A hashed page is never written again (`reserve`
copies it first, as it copies a shared page), and when its last holder frees it, it stays
cached until the allocator needs it.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field

import torch

from mstar.engine.prefix_cache import PrefixTable
from mstar.model.contract import KVSpec
from mstar.model.forward import SeqKey


class OutOfPages(RuntimeError):
    """The pool has too few free pages for a reservation; nothing was changed."""


class PagePool:
    """The pages of one KV node on one rank, with a free list and per-page reference counts.

    Storage is one tensor `[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`
    (index 0 of the second axis is K, 1 is V). It is zero-filled so that padded reads of
    unused slots (masked out by attention) never meet NaN garbage.

    A page no sequence holds is free: either never cached (the free list) or idle in the
    `prefix` table (cached K/V kept for reuse). `allocate` takes never-cached pages first,
    then evicts the least recently released cached ones.
    """

    def __init__(self, spec: KVSpec, num_pages: int, page_size: int,
                 device: torch.device | str = "cpu") -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages ({num_pages}) and page_size ({page_size}) must be >= 1")
        self.spec = spec
        self.device = torch.device(device)
        self._page_size = page_size
        self.kv = torch.zeros(spec.num_layers, 2, num_pages, page_size, spec.num_kv_heads,
                              spec.head_dim, dtype=spec.dtype, device=self.device)
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self.prefix = PrefixTable()
        # Built once: every layer's attention reads them at every step.
        shape = (num_pages * page_size, spec.num_kv_heads, spec.head_dim)
        self._flat = [(self.kv[i, 0].view(shape), self.kv[i, 1].view(shape))
                      for i in range(spec.num_layers)]
        #: Every flat slot in order, and as `[num_pages, page_size]` (row p holds page p's
        #: slots), so that a batch's page table indexes its slots in one call (`slot_table`).
        self.slot_ids = torch.arange(num_pages * page_size, device=self.device)
        self.page_slots = self.slot_ids.view(num_pages, page_size)

    @property
    def num_pages(self) -> int:
        return len(self._refs)

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_free(self) -> int:
        """Pages no sequence holds (cached idle pages included: they can be taken)."""
        return len(self._free) + self.prefix.num_idle

    @property
    def num_cached(self) -> int:
        """Free pages that still hold reusable, hashed K/V."""
        return self.prefix.num_idle

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def k_cache(self, layer: int) -> torch.Tensor:
        """K of `layer` as a view `[num_pages, page_size, KVH, D]`."""
        return self.kv[layer, 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """V of `layer` as a view `[num_pages, page_size, KVH, D]`."""
        return self.kv[layer, 1]

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer` as views `[num_pages * page_size, KVH, D]`, indexed by slot."""
        return self._flat[layer]

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages with reference count 1, never-cached ones first, then evicted
        cached ones (least recently released first); raises `OutOfPages` (allocating none)."""
        if n > self.num_free:
            raise OutOfPages(f"need {n} pages, {self.num_free} of {self.num_pages} free")
        pages = [self._free.popleft() if self._free else self.prefix.evict() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def take(self, pages: list[int]) -> None:
        """Allocate exactly `pages` (a tensor-parallel follower takes the pages its leader
        allocated): each must be free here; a cached idle one is evicted, as the leader's
        allocation evicted it. Then the follower's page ids, and so its page tables and its
        prefix cache, stay the leader's whatever the order it frees pages in."""
        for p in pages:
            if self._refs[p] != 0:
                raise RuntimeError(f"page {p} is in use here; the leader allocated it")
        for p in pages:
            if self.prefix.is_idle(p):
                self.prefix.evict(p)
            else:
                self._free.remove(p)
            self._refs[p] = 1

    def incref(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} is free; cannot share it")
        self._refs[page] += 1

    def reuse(self, page: int) -> None:
        """Take one more reference to a cached page, idle or held."""
        if self._refs[page] == 0:
            self.prefix.revive(page)
            self._refs[page] = 1
        else:
            self.incref(page)

    def decref(self, page: int) -> None:
        """Drop one reference; at zero the page is free again (kept cached if hashed)."""
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} is already free")
        self._refs[page] -= 1
        if self._refs[page] == 0 and not self.prefix.release(page):
            self._free.append(page)

    def immutable(self, page: int) -> bool:
        """Writing `page` would change K/V someone else relies on: another holder's, or the
        cached K/V of its hash. Such a page is copied before a write."""
        return self._refs[page] > 1 or self.prefix.is_hashed(page)

    def copy_page(self, src: int, dst: int) -> None:
        """Copy every layer's K/V of page `src` into page `dst`."""
        self.kv[:, :, dst].copy_(self.kv[:, :, src])


@dataclass
class SeqExport:
    """One sequence's K/V in token order, `kv` `[num_layers, 2, length, KVH, D]`: what a
    transport moves when a sequence migrates between workers."""

    length: int
    kv: torch.Tensor


@dataclass
class _Seq:
    pages: list[int] = field(default_factory=list)
    length: int = 0


class KVCacheManager:
    """The sequences of one KV node over one `PagePool`."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._seqs: dict[SeqKey, _Seq] = {}

    # -- bookkeeping -----------------------------------------------------------------------

    def _get(self, key: SeqKey) -> _Seq:
        try:
            return self._seqs[key]
        except KeyError:
            raise KeyError(f"no KV sequence {key}") from None

    def create(self, key: SeqKey) -> None:
        """Start an empty sequence."""
        if key in self._seqs:
            raise ValueError(f"KV sequence {key} already exists")
        self._seqs[key] = _Seq()

    def has(self, key: SeqKey) -> bool:
        return key in self._seqs

    def length(self, key: SeqKey) -> int:
        """Committed tokens (those whose K/V are in the cache)."""
        return self._get(key).length

    def capacity(self, key: SeqKey) -> int:
        """Tokens the sequence's pages can hold (committed plus reserved)."""
        return len(self._get(key).pages) * self.pool.page_size

    def page_table(self, key: SeqKey) -> list[int]:
        return list(self._get(key).pages)

    def keys(self, request_id: str | None = None) -> list[SeqKey]:
        """Every sequence, or those of one request, in creation order."""
        return [k for k in self._seqs if request_id is None or k.request_id == request_id]

    # -- growing ---------------------------------------------------------------------------

    def _plan(self, seq: _Seq, n_new: int) -> tuple[int, list[int]]:
        """(pages to append, indices of shared pages in the write range to copy)."""
        if n_new <= 0:
            return 0, []
        ps = self.pool.page_size
        need = math.ceil((seq.length + n_new) / ps)
        first = seq.length // ps
        cow = [i for i in range(first, min(need, len(seq.pages)))
               if self.pool.immutable(seq.pages[i])]
        return max(0, need - len(seq.pages)), cow

    def pages_needed(self, key: SeqKey, n_new: int) -> int:
        """Pages `reserve(key, n_new)` would allocate, copy-on-write copies included."""
        new, cow = self._plan(self._get(key), n_new)
        return new + len(cow)

    def reserve(self, key: SeqKey, n_new: int) -> None:
        """Make room for `n_new` tokens after `length`, copying shared or hashed pages that
        they would overwrite. Call it again after a `fork` of this sequence before writing. Raises
        `OutOfPages` with the state unchanged when the pool is short."""
        seq = self._get(key)
        new, cow = self._plan(seq, n_new)
        if not (new or cow):
            return  # the room is there (most decode steps)
        fresh = self.pool.allocate(new + len(cow))
        for i, page in zip(cow, fresh[:len(cow)]):
            self.pool.copy_page(seq.pages[i], page)
            self.pool.decref(seq.pages[i])
            seq.pages[i] = page
        seq.pages.extend(fresh[len(cow):])

    def reserve_as(self, key: SeqKey, pages: list[int]) -> None:
        """A tensor-parallel follower's `reserve`: make the sequence's page table from page
        `length // page_size` on equal `pages`, the leader's after its reserve (its new
        pages and copy-on-write copies, taken by id with `PagePool.take`)."""
        seq = self._get(key)
        fresh = [(i, p) for i, p in enumerate(pages, seq.length // self.pool.page_size)
                 if i >= len(seq.pages) or seq.pages[i] != p]
        self.pool.take([p for _, p in fresh])
        for i, page in fresh:
            if i < len(seq.pages):
                self.pool.copy_page(seq.pages[i], page)
                self.pool.decref(seq.pages[i])
                seq.pages[i] = page
            else:
                seq.pages.append(page)

    def slots(self, key: SeqKey, start: int, n: int, *, write: bool = True) -> torch.Tensor:
        """Flat slot indices (`page * page_size + offset`) of positions `start..start+n-1`,
        a LongTensor `[n]` on the pool's device. The range must be reserved. With `write`
        (the default) every page of the range must be exclusive to this sequence and
        unhashed: writing it would change a fork's or the prefix cache's K/V, so `reserve`
        must have copied it."""
        seq = self._get(key)
        ps = self.pool.page_size
        if start < 0 or start + n > len(seq.pages) * ps:
            raise ValueError(f"positions [{start}, {start + n}) of {key} are not reserved "
                             f"(capacity {len(seq.pages) * ps})")
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=self.pool.device)
        first, last = start // ps, (start + n - 1) // ps
        if write:
            self._check_writable(key, seq, first, last)
        pos = torch.arange(start, start + n, dtype=torch.long)
        table = torch.tensor(seq.pages[first:last + 1], dtype=torch.long)
        return (table[pos // ps - first] * ps + pos % ps).to(self.pool.device)

    def _check_writable(self, key: SeqKey, seq: _Seq, first: int, last: int) -> None:
        if any(self.pool.immutable(seq.pages[i]) for i in range(first, last + 1)):
            raise RuntimeError(f"pages {first}..{last} of {key} include a shared page (or a "
                               "cached one); reserve() before writing")

    def slot_table(self, keys: list[SeqKey], lengths: list[int], *,
                   write_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The index tensors of a whole batch, from one copy of its page tables instead of
        one `slots` per sequence: the flat slots of positions `0..lengths[i]-1` of every
        sequence `keys[i]`, as one `[B, max(lengths)]` LongTensor (a view; past a row's
        length it holds some valid slot, to be masked), which of them are the row's
        (`[B, max(lengths)]` bool), and each row's last slot (`[B]`). A decode step builds
        it at every step, so it makes a fixed number of torch calls (each one lets the
        threads serving clients take the GIL) whatever the batch. With `write_last`, each
        row's last position is about to be written (its page must be exclusive, as in
        `slots`)."""
        ps = self.pool.page_size
        width = max(lengths)
        n_pages = -(-width // ps)
        rows, last = [], []
        for key, n in zip(keys, lengths):
            seq = self._get(key)
            if n > len(seq.pages) * ps:
                raise ValueError(f"positions [0, {n}) of {key} are not reserved "
                                 f"(capacity {len(seq.pages) * ps})")
            if write_last:
                self._check_writable(key, seq, (n - 1) // ps, (n - 1) // ps)
            pages = seq.pages[:n_pages]
            rows.append(pages + [0] * (n_pages - len(pages)))
            last.append(seq.pages[(n - 1) // ps] * ps + (n - 1) % ps)
        device = self.pool.device
        table = torch.tensor(rows, dtype=torch.long, device=device)
        slots = self.pool.page_slots[table].view(len(keys), n_pages * ps)[:, :width]
        lens = torch.tensor([[n] for n in lengths], dtype=torch.long, device=device)
        valid = self.pool.slot_ids[:width] < lens  # columns 0..width-1 against [B, 1]
        return slots, valid, torch.tensor(last, dtype=torch.long, device=device)

    def commit(self, key: SeqKey, n: int) -> None:
        """The `n` reserved tokens after `length` now hold K/V."""
        seq = self._get(key)
        if n < 0 or seq.length + n > len(seq.pages) * self.pool.page_size:
            raise ValueError(f"cannot commit {n} tokens to {key}: length {seq.length}, "
                             f"capacity {len(seq.pages) * self.pool.page_size}")
        seq.length += n

    # -- sharing and shrinking ---------------------------------------------------------------

    def fork(self, src: SeqKey, dst: SeqKey, length: int | None = None) -> None:
        """Make `dst` (new; any label/child) share the first `length` tokens of `src`
        (all when None). Pages are shared by reference, a partially covered last page too:
        whichever side writes into it first gets its own copy at its next `reserve`."""
        s = self._get(src)
        length = s.length if length is None else length
        if not 0 <= length <= s.length:
            raise ValueError(f"cannot fork {length} tokens of {src} (length {s.length})")
        if dst in self._seqs:
            raise ValueError(f"KV sequence {dst} already exists")
        pages = s.pages[:math.ceil(length / self.pool.page_size)]
        for p in pages:
            self.pool.incref(p)
        self._seqs[dst] = _Seq(pages=list(pages), length=length)

    def truncate(self, key: SeqKey, length: int) -> None:
        """Roll back to `length` tokens, releasing pages (reserved ones included) that no
        longer hold any of them."""
        seq = self._get(key)
        if not 0 <= length <= seq.length:
            raise ValueError(f"cannot truncate {key} of length {seq.length} to {length}")
        keep = math.ceil(length / self.pool.page_size)
        for p in reversed(seq.pages[keep:]):
            self.pool.decref(p)
        del seq.pages[keep:]
        seq.length = length

    def free(self, key: SeqKey) -> None:
        """Drop the sequence. Its pages are released last page first, so that cached
        prefixes are evicted from their tails (a chain is useless without its head)."""
        seq = self._get(key)
        for p in reversed(seq.pages):
            self.pool.decref(p)
        del self._seqs[key]

    # -- prefix caching --------------------------------------------------------------------

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest run of `hashes` (a prompt's page hashes)."""
        pages: list[int] = []
        for h in hashes:
            page = self.pool.prefix.lookup(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def adopt(self, key: SeqKey, pages: list[int]) -> int | None:
        """Continue the sequence `key` after its last full page with the cached full `pages`
        (shared by reference, never copied: nobody writes a hashed page). A partly filled
        last page is detached, not released (its tokens are the first of `pages[0]`): it is
        returned, for the caller to release once the adoption stands or to hand `unadopt`."""
        seq = self._get(key)
        ps = self.pool.page_size
        if len(seq.pages) != math.ceil(seq.length / ps):
            raise ValueError(f"KV sequence {key} holds reserved pages; cannot adopt cached pages")
        full = seq.length // ps
        detached = seq.pages.pop() if seq.length % ps else None
        for p in pages:
            self.pool.reuse(p)
        seq.pages.extend(pages)
        seq.length = (full + len(pages)) * ps
        return detached

    def unadopt(self, key: SeqKey, length: int, detached: int | None) -> None:
        """Undo `adopt`: back to the `length` tokens it had, the detached page in place."""
        ps = self.pool.page_size
        self.truncate(key, length // ps * ps)
        seq = self._get(key)
        if detached is not None:
            seq.pages.append(detached)
        seq.length = length

    def register(self, key: SeqKey, hashes: list[bytes], start: int = 0) -> int:
        """Cache the sequence's full committed pages `start..` under `hashes` (page `i`
        under `hashes[i]`; their K/V are final). Returns the first page not yet covered, the
        `start` of the next call."""
        seq = self._get(key)
        end = min(len(hashes), seq.length // self.pool.page_size)
        for i in range(start, end):
            self.pool.prefix.register(seq.pages[i], hashes[i])
        return max(start, end)

    def free_request(self, request_id: str) -> None:
        """Free every sequence of a request (every label and child)."""
        for key in self.keys(request_id):
            self.free(key)

    # -- data ------------------------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter new K/V `[n, KVH, D]` into `layer` at flat `slots`."""
        kf, vf = self.pool.flat(layer)
        kf.index_copy_(0, slots, k.to(kf.dtype))
        vf.index_copy_(0, slots, v.to(vf.dtype))

    def gather(self, layer: int, key: SeqKey, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[length, KVH, D]` of the sequence's first `length` tokens, in order."""
        slots = self.slots(key, 0, length, write=False)
        kf, vf = self.pool.flat(layer)
        return kf[slots], vf[slots]

    def export(self, key: SeqKey) -> SeqExport:
        """A contiguous copy of the sequence's committed K/V, every layer."""
        seq = self._get(key)
        n = math.ceil(seq.length / self.pool.page_size)
        idx = torch.tensor(seq.pages[:n], dtype=torch.long, device=self.pool.device)
        kv = self.pool.kv.index_select(2, idx)  # [L, 2, n, page, KVH, D]
        kv = kv.flatten(2, 3)[:, :, :seq.length].contiguous()
        return SeqExport(length=seq.length, kv=kv)

    def import_sequence(self, key: SeqKey, exported: SeqExport,
                        pages: list[int] | None = None) -> None:
        """Create `key` holding `exported`'s K/V (in the leader's `pages` on a
        tensor-parallel follower). Raises `OutOfPages` leaving no trace."""
        spec = self.pool.spec
        want = (spec.num_layers, 2, exported.length, spec.num_kv_heads, spec.head_dim)
        if tuple(exported.kv.shape) != want:
            raise ValueError(f"exported KV has shape {tuple(exported.kv.shape)}, this cache "
                             f"expects {want}")
        self.create(key)
        try:
            if pages is None:
                self.reserve(key, exported.length)
            else:
                self.reserve_as(key, pages)
        except OutOfPages:
            del self._seqs[key]
            raise
        slots = self.slots(key, 0, exported.length)
        flat = self.pool.kv.view(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)
        flat.index_copy_(2, slots, exported.kv.to(flat.device, flat.dtype))
        self.commit(key, exported.length)


# ----------------------------------------------------------------------------------------
# Capacity: how many pages each KV node of a rank gets.


def _free_memory(device: torch.device) -> int:
    """Free bytes on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens of one sequence."""
    return -(-tokens // page_size)


def max_useful_pages(max_seq_len: int, page_size: int, max_num_seqs: int) -> int:
    """Pages a pool can use at most: `max_num_seqs` sequences (one step's batch) of
    `max_seq_len` tokens each. A pool planned from memory never gets more."""
    return pages_for(max_seq_len, page_size) * max_num_seqs


def capacity_tokens(num_pages: int | None, page_size: int, max_seq_len: int,
                    max_num_seqs: int) -> int:
    """Tokens one KV node's pool holds: the configured pages, or (planned from memory, not
    known before the worker starts) the most it may get, `max_useful_pages`."""
    if num_pages is None:
        num_pages = max_useful_pages(max_seq_len, page_size, max_num_seqs)
    return num_pages * page_size


def pages_for_completions(prompt: int, max_tokens: int, n: int, *, max_seq_len: int,
                          page_size: int) -> int:
    """Pages `n` completions of a `prompt`-token prompt hold together at their longest. A
    completion of `max_tokens` tokens holds `prompt + max_tokens - 1` tokens (its last token
    is sampled, never run; max_seq_len at most); completions after the first share the
    prompt's full pages before its last token (a fork shares whole pages; each child runs
    or re-reads that last token itself)."""
    own = pages_for(min(prompt + max_tokens - 1, max_seq_len), page_size)
    return own + (n - 1) * (own - (prompt - 1) // page_size)


def device_kv_budget(total_bytes: int, *, memory_fraction: float, ranks_sharing_device: int,
                     weights_bytes: int, peak_activation_bytes: int) -> float:
    """Bytes of KV cache one rank may hold on a CUDA device, as vLLM's
    `gpu_memory_utilization`: its share (`ranks_sharing_device`) of `memory_fraction` of
    the device's total memory, less what the rank already holds (`weights_bytes`) and the
    peak of one forward at the scheduler's token budget (`peak_activation_bytes`, measured
    by `kv_profile.profile_peak`). Pages follow as floor(budget / page_bytes). An
    empty budget is an error naming `kv_cache.memory_fraction`."""
    share = total_bytes * memory_fraction / ranks_sharing_device
    budget = share - weights_bytes - peak_activation_bytes
    if budget <= 0:
        raise ValueError(
            f"kv_cache.memory_fraction: {memory_fraction} of {total_bytes / 2**30:.2f} GiB over "
            f"{ranks_sharing_device} rank(s) is {share / 2**30:.2f} GiB per rank, less than its "
            f"weights ({weights_bytes / 2**30:.2f} GiB) and peak activations "
            f"({peak_activation_bytes / 2**30:.2f} GiB); raise kv_cache.memory_fraction or "
            "put fewer ranks on the device")
    return budget


def plan_capacity(specs: dict[str, KVSpec], *, max_seq_len: int, page_size: int,
                  num_pages: int | None, memory_fraction: float, ranks_sharing_device: int,
                  shares: dict[str, float] | None, device: torch.device | str,
                  max_num_seqs: int, free_bytes: int | None = None,
                  budget_bytes: float | None = None) -> dict[str, int]:
    """Pages per KV node on this rank.

    An explicit `num_pages` gives every node that many (config validation checked that one
    `max_seq_len` sequence fits). Otherwise `memory_fraction` of the device's free memory
    (`free_bytes` when the caller measured it), divided by the ranks sharing the device, is
    split between the nodes by `shares` (names of nodes on other ranks are ignored) or, by
    default, by each node's bytes per token x `max_seq_len`, and capped at
    `max_useful_pages` (memory a small model could never fill stays free). `budget_bytes`
    (on CUDA, from `device_kv_budget`) replaces that share of free memory. A node that
    would get fewer pages than one `max_seq_len` sequence needs is an error.
    """
    if num_pages is not None:
        return dict.fromkeys(specs, num_pages)
    if not specs:
        return {}
    if ranks_sharing_device < 1:
        raise ValueError(f"ranks_sharing_device must be >= 1, got {ranks_sharing_device}")
    if shares is not None:
        missing = sorted(set(specs) - set(shares))
        if missing:
            raise ValueError(f"kv_cache.shares has no share for KV node(s) {missing}; "
                             f"give every KV node of this rank a share ({sorted(specs)})")
        weights = {name: float(shares[name]) for name in specs}
        if any(w <= 0 for w in weights.values()):
            raise ValueError(f"kv_cache.shares must be positive, got {weights}")
    else:
        weights = {name: float(s.bytes_per_token() * max_seq_len) for name, s in specs.items()}
    dev = torch.device(device)
    if budget_bytes is None:
        free = _free_memory(dev) if free_bytes is None else free_bytes
        budget = free * memory_fraction / ranks_sharing_device
        source = (f"{memory_fraction} of {free / 2**30:.2f} GiB free over "
                  f"{ranks_sharing_device} rank(s)")
    else:
        budget = budget_bytes
        source = f"a budget of {budget / 2**30:.2f} GiB"
    total = sum(weights.values())
    min_pages = pages_for(max_seq_len, page_size)
    cap = max_useful_pages(max_seq_len, page_size, max_num_seqs)
    out: dict[str, int] = {}
    for name, spec in specs.items():
        page_bytes = spec.bytes_per_token() * page_size
        pages = int(budget * weights[name] / total // page_bytes)
        if pages < min_pages:
            raise ValueError(
                f"KV cache too small for node {name!r} on {dev}: {source} gives it "
                f"{pages} pages of {page_size} tokens, but one sequence of max_seq_len="
                f"{max_seq_len} needs {min_pages}; raise kv_cache.memory_fraction, lower "
                f"max_seq_len, or set kv_cache.num_pages")
        out[name] = min(pages, cap)
    return out
