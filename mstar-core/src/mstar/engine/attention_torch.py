"""The reference attention backend: gather the cached K/V, build the segment masks, SDPA.

It is built once per engine step from the step's `SeqChunk`s; everything that does not
depend on the layer (each sequence's mask, the slots of its cached context and of its new
tokens) is computed then and reused by every layer. Faster backends are tested against it.

Masks follow the segment rule of `mstar.model.ragged.segment_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mstar.engine.kv_cache import KVCacheManager
from mstar.model.forward import ForwardBatch, SeqChunk, attention_context
from mstar.model.ragged import segment_mask


@dataclass
class _Plan:
    """One sequence's per-step attention metadata."""

    rows: slice
    mask: torch.Tensor | None  # [n, context_len + n]; None on the batched-decode path
    context_slots: torch.Tensor | None  # [context_len] flat cache slots; None: no context


@dataclass
class _Decode:
    """The batched decode path: every chunk is one token."""

    slots: torch.Tensor  # [B * C] context slots (+ the new token's when write_first), pad 0
    width: int  # C (+ 1 when write_first): the padded context of every row
    mask: torch.Tensor  # [B, 1, 1, C + 1]
    write_first: bool = False


class TorchAttention:
    """`AttentionBackend` over a `KVCacheManager` (or none: scratch chunks without context).

    The engine reserves room for every `append` chunk before building this; `attend` writes
    those chunks' new K/V into the cache. `scratch` chunks join the step's attention and are
    never written.
    """

    def __init__(self, seqs: list[SeqChunk], *, cache: KVCacheManager | None = None,
                 device: torch.device | str | None = None, batched_decode: bool = True) -> None:
        """`batched_decode=False` keeps a step of one-token chunks on the per-sequence path
        (the reference the batched one is tested against)."""
        self.cache = cache
        dev = torch.device(device) if device is not None else (
            cache.pool.device if cache is not None else torch.device("cpu"))
        self.num_tokens = 0
        self._plans: list[_Plan] = []
        #: Whether this step runs one padded SDPA (every chunk is one token: decode).
        self.uses_batched_decode = batched_decode and bool(seqs) and all(
            s.length == 1 for s in seqs)
        rows: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        self._decode: _Decode | None = None
        if self.uses_batched_decode and cache is not None and all(
                s.mode == "append" for s in seqs):
            self._decode = self._append_decode_plan(seqs, cache)
        for s in seqs:
            if s.start != self.num_tokens:
                raise ValueError(f"chunk of {s.key} starts at row {s.start}, expected "
                                 f"{self.num_tokens}: chunks must be back to back")
            if sum(seg.length for seg in s.segments) != s.length:
                raise ValueError(f"segments of {s.key} sum to "
                                 f"{sum(seg.length for seg in s.segments)}, not {s.length}")
            if cache is None and (s.context_len or s.mode == "append"):
                raise ValueError(f"chunk of {s.key} has context or is 'append', but there is "
                                 "no KV cache")
            if self._decode is not None:  # its slots and masks are made for the whole batch
                self.num_tokens += s.length
                continue
            ctx = cache.slots(s.key, 0, s.context_len, write=False) if s.context_len else None
            if s.mode == "append" and cache is not None:
                rows.append(torch.arange(s.start, s.start + s.length, device=dev))
                slots.append(cache.slots(s.key, s.context_len, s.length))
            self._plans.append(_Plan(rows=slice(s.start, s.start + s.length),
                                     mask=None if self.uses_batched_decode else
                                     segment_mask(s.context_len, s.segments, dev),
                                     context_slots=ctx))
            self.num_tokens += s.length
        self._write_rows = torch.cat(rows) if rows else None
        if self._decode is None:
            self._write_slots = torch.cat(slots) if slots else None
            if self.uses_batched_decode:
                self._decode = self._decode_plan(seqs, dev)

    def _append_decode_plan(self, seqs: list[SeqChunk], cache: KVCacheManager) -> _Decode:
        """The decode step of appended one-token chunks (the common case): its new tokens
        are written first, then gathered with their context from one slot table (each
        row's last valid column is its new token) built from the page tables in one go."""
        slots, valid, self._write_slots = cache.slot_table(
            [s.key for s in seqs], [s.context_len + 1 for s in seqs], write_last=True)
        batch, width = slots.shape
        return _Decode(slots=slots.reshape(-1), width=width,
                       mask=valid.view(batch, 1, 1, width), write_first=True)

    def _decode_plan(self, seqs: list[SeqChunk], dev: torch.device) -> _Decode:
        """One-token chunks not all appended (or no cache): every context padded to the
        longest, the new token concatenated as the last column."""
        longest = max(s.context_len for s in seqs)
        slots = torch.zeros(len(seqs), longest, dtype=torch.long, device=dev)
        lens = torch.tensor([s.context_len for s in seqs], device=dev)
        for i, plan in enumerate(self._plans):
            if plan.context_slots is not None:
                slots[i, :plan.context_slots.shape[0]] = plan.context_slots
        cols = torch.arange(longest + 1, device=dev)
        mask = (cols[None, :] < lens[:, None]) | (cols[None, :] == longest)
        return _Decode(slots=slots.view(-1), width=longest, mask=mask[:, None, None, :])

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, KVH, D]` of the new tokens -> `[T, H, D]`."""
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"attention got {q.shape[0]} tokens, the step has "
                             f"{self.num_tokens}")
        if self._decode is not None and self._decode.write_first:
            assert self.cache is not None and self._write_slots is not None
            self.cache.write(layer_idx, self._write_slots, k, v)
            return self._attend_decode(layer_idx, q, k, v, scale)
        if self._decode is not None:
            out = self._attend_decode(layer_idx, q, k, v, scale)
        else:
            out = self._attend_each(layer_idx, q, k, v, scale)
        if self._write_slots is not None:
            assert self.cache is not None and self._write_rows is not None
            self.cache.write(layer_idx, self._write_slots, k[self._write_rows],
                             v[self._write_rows])
        return out

    def _attend_each(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """The reference path: one SDPA per sequence over its context and new tokens."""
        out = torch.empty_like(q)
        flat = self.cache.pool.flat(layer_idx) if self.cache is not None else None
        for plan in self._plans:
            ks, vs = k[plan.rows], v[plan.rows]
            if plan.context_slots is not None:
                assert flat is not None
                kc = flat[0].index_select(0, plan.context_slots)
                vc = flat[1].index_select(0, plan.context_slots)
                ks = torch.cat([kc.to(k.dtype), ks])
                vs = torch.cat([vc.to(v.dtype), vs])
            o = F.scaled_dot_product_attention(
                q[plan.rows].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                attn_mask=plan.mask, scale=scale, enable_gqa=True)
            out[plan.rows] = o.transpose(0, 1)
        return out

    def _attend_decode(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, scale: float) -> torch.Tensor:
        """One batched SDPA for one-token chunks, contexts padded and masked."""
        assert self._decode is not None
        if self._decode.write_first:  # the new K/V are in the cache already
            ks, vs = self._gather(layer_idx, k.dtype)
        else:
            ks, vs = k[:, None], v[:, None]  # [B, 1, KVH, D]
            if self.cache is not None and self._decode.width:
                kc, vc = self._gather(layer_idx, k.dtype)
                ks, vs = torch.cat([kc, ks], dim=1), torch.cat([vc, vs], dim=1)
        o = F.scaled_dot_product_attention(
            q[:, :, None], ks.transpose(1, 2), vs.transpose(1, 2),
            attn_mask=self._decode.mask, scale=scale, enable_gqa=True)
        return o[:, :, 0]

    def _gather(self, layer_idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[B, C, KVH, D]` of the decode rows' padded slots (`index_select` on the
        flat slots: several times faster on CPU than indexing by a 2-D slot tensor)."""
        assert self._decode is not None and self.cache is not None
        kf, vf = self.cache.pool.flat(layer_idx)
        shape = (-1, self._decode.width, kf.shape[1], kf.shape[2])
        ks = kf.index_select(0, self._decode.slots).view(shape)
        vs = vf.index_select(0, self._decode.slots).view(shape)
        if ks.dtype != dtype:
            ks, vs = ks.to(dtype), vs.to(dtype)
        return ks, vs


def forward_step(module: torch.nn.Module, batch: ForwardBatch, cache: KVCacheManager
                 ) -> list[dict[str, torch.Tensor]]:
    """One step of a KV node over `batch` outside the engine (a plugin's oracle tests drive
    their node this way): attention over `cache` (each sequence already created and, for an
    appended chunk, reserved), appended chunks committed, then each sequence's named outputs
    cut from the batch's in sequence order."""
    with torch.no_grad(), attention_context(TorchAttention(batch.seqs, cache=cache)):
        out = module(batch)
    for s in batch.seqs:
        if s.mode == "append":
            cache.commit(s.key, s.length)
    offsets = dict.fromkeys(out, 0)
    results = []
    for s in batch.seqs:
        mine = {}
        for name, (_, count) in s.outputs.items():
            mine[name] = out[name][offsets[name]:offsets[name] + count]
            offsets[name] += count
        results.append(mine)
    return results
