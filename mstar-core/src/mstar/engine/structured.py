"""Structured outputs: grammar state per sampled sequence, as allowed-token masks.

A row whose params carry a `response_format` may only sample tokens that keep its text a
prefix of the grammar's language (llguidance computes that set per step). The state lives
beside the engine, not in the sequence: it is one llguidance matcher per sequence key,
advanced with the row's `history` tokens it has not consumed yet. History is the source of
truth, so preemption by recompute, migration and forks need no grammar bookkeeping: a
matcher missing or out of step with its history (shorter, or different) is rebuilt from it.
The grammar itself (compiled and validated at admission) comes from `mstar.model.grammar`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import torch

from mstar.model.forward import SeqKey
from mstar.model.grammar import grammar_text
from mstar.model.sampling import ResponseFormat

if TYPE_CHECKING:
    from mstar.engine.sampler import SampleRequest

#: Threads that compute one step's masks in parallel (each row's mask is independent).
_MASK_THREADS = min(4, os.cpu_count() or 1)
#: Errors name the failure only: verbose ones dump the parser state and the whole grammar.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class _BytesVocab:
    """A tokenizer that lists each id's bytes (`token_bytes()`, b"" for specials), in the
    shape llguidance's `TokenizerWrapper` reads."""

    def __init__(self, tokenizer: Any, eos: list[int]):
        self.tokens: list[bytes] = list(tokenizer.token_bytes())
        self.eos_token_id = eos[0]
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = [i for i, b in enumerate(self.tokens) if not b]
        self._encode = tokenizer.encode

    def __call__(self, text: bytes | str) -> list[int]:
        # llguidance hands over valid UTF-8 only (it tokenizes any tail itself).
        return list(self._encode(text.decode() if isinstance(text, bytes) else text))


def llg_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer: one offering `token_bytes()`, `encode()`
    and `eos_token_id`, or a fast Hugging Face tokenizer. ValueError for anything else."""
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = list(eos) if isinstance(eos, list | tuple) else ([eos] if eos is not None else [])
    if callable(getattr(tokenizer, "token_bytes", None)):
        if not eos_ids:
            raise ValueError("response_format needs a tokenizer with an eos_token_id")
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(
            _BytesVocab(tokenizer, eos_ids)), eos_token=eos_ids)
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        from llguidance.hf import from_tokenizer

        return from_tokenizer(tokenizer, eos_token=eos_ids or None)
    raise ValueError(f"response_format is not supported with a {type(tokenizer).__name__}: "
                     "the model's tokenizer must be a fast Hugging Face tokenizer or offer "
                     "token_bytes()")


def unpack_bitmask(bitmask: torch.Tensor, known: int, vocab: int,
                   device: torch.device) -> torch.Tensor:
    """llguidance's int32 bitmask [B, ceil(known / 32)] (bit i % 32 of word i // 32) as a
    bool mask [B, vocab] on `device`. Ids past the `known` ones (the tokenizer's vocabulary;
    a model's logits are often wider) are never allowed."""
    words = bitmask.to(device)
    byte_view = words.view(torch.uint8)  # little-endian: byte j holds ids 8j .. 8j+7
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = ((byte_view.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    allowed = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool, device=device)
    n = min(vocab, known)
    allowed[:, :n] = bits[:, :n]
    return allowed


def _error(matcher: llguidance.LLMatcher) -> str:
    return matcher.get_error().removesuffix("<non-verbose/>").strip()


@dataclass
class RowMasks:
    """One step's constraint: `allowed[j]` is the token set of batch row `rows[j]`.
    `failed` maps a batch row to why its constraint could not be applied (its row allows
    everything; the engine fails that request rather than sample it unconstrained)."""

    rows: list[int]
    allowed: torch.Tensor
    failed: dict[int, str]


@dataclass
class _Seq:
    fmt: ResponseFormat
    matcher: llguidance.LLMatcher
    consumed: list[int]


class GrammarStates:
    """The grammar state of every constrained sequence of one engine.

    `tokenizer` returns the model's tokenizer; it is called once, on the first constrained
    row, so engines of models that never see a `response_format` pay nothing."""

    def __init__(self, tokenizer: Callable[[], Any] | None = None, *, cache_size: int = 64):
        self._tokenizer_source = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._compiled: collections.OrderedDict[ResponseFormat, llguidance.LLMatcher] = (
            collections.OrderedDict())
        self._cache_size = cache_size
        self._seqs: dict[SeqKey, _Seq] = {}
        self._executor: llguidance.LLExecutor | None = None

    def __len__(self) -> int:
        return len(self._seqs)

    def release(self, key: SeqKey) -> None:
        self._seqs.pop(key, None)

    def release_request(self, request_id: str) -> None:
        for key in [k for k in self._seqs if k.request_id == request_id]:
            del self._seqs[key]

    def masks(self, rows: Sequence[SampleRequest], vocab: int,
              device: torch.device | str = "cpu") -> RowMasks | None:
        """The allowed tokens of the constrained rows (None when no row is constrained),
        after advancing each row's matcher to its history."""
        idx = [i for i, r in enumerate(rows) if r.params.response_format is not None]
        if not idx:
            return None
        failed: dict[int, str] = {}
        tokenizer = self._llg_tokenizer()
        known = tokenizer.vocab_size if tokenizer else vocab
        words = (known + 31) // 32
        bitmask = torch.zeros(len(idx), words, dtype=torch.int32)
        ready: list[tuple[llguidance.LLMatcher, int]] = []
        for j, i in enumerate(idx):
            row = rows[i]
            try:
                if tokenizer is None:
                    raise ValueError(self._tokenizer_error)
                if row.key is None:
                    raise ValueError("response_format needs a sequence key (in-node sampling "
                                     "cannot be constrained)")
                ready.append((self._sync(tokenizer, row.key, row.params.response_format,
                                         row.history), j))
            except ValueError as exc:
                failed[i] = str(exc)
        if ready:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(num_threads=_MASK_THREADS)
            self._executor.unsafe_compute_mask_ptr(ready, bitmask.data_ptr(), words * 4,
                                                   len(idx))
        for matcher, j in ready:
            if matcher.is_error():
                failed[idx[j]] = f"response_format: {_error(matcher)}"
        allowed = unpack_bitmask(bitmask, known, vocab, torch.device(device))
        for j, i in enumerate(idx):
            if i in failed:
                allowed[j] = True
        return RowMasks(idx, allowed, failed)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer | None:
        if self._tokenizer is None and self._tokenizer_error is None:
            source = self._tokenizer_source() if self._tokenizer_source else None
            if source is None:
                self._tokenizer_error = "response_format needs a model with a tokenizer"
            else:
                try:
                    self._tokenizer = llg_tokenizer(source)
                except Exception as exc:  # whatever the conversion hits fails these rows only
                    self._tokenizer_error = f"response_format: {type(exc).__name__}: {exc}"
        return self._tokenizer

    def _template(self, tokenizer: llguidance.LLTokenizer,
                  fmt: ResponseFormat) -> llguidance.LLMatcher:
        """A matcher in its start state for `fmt` (compiling is the costly part; a sequence
        starts from a copy)."""
        if fmt in self._compiled:
            self._compiled.move_to_end(fmt)
            return self._compiled[fmt]
        matcher = llguidance.LLMatcher(tokenizer, grammar_text(fmt), log_level=0,
                                       limits=_LIMITS)
        if matcher.is_error():
            raise ValueError(f"response_format: {_error(matcher)}")
        self._compiled[fmt] = matcher
        if len(self._compiled) > self._cache_size:
            self._compiled.popitem(last=False)
        return matcher

    def _sync(self, tokenizer: llguidance.LLTokenizer, key: SeqKey, fmt: ResponseFormat,
              history: Sequence[int]) -> llguidance.LLMatcher:
        """The key's matcher, having consumed exactly `history`."""
        history = list(history)
        seq = self._seqs.get(key)
        if seq is None or seq.fmt != fmt or history[:len(seq.consumed)] != seq.consumed:
            seq = _Seq(fmt, self._template(tokenizer, fmt).deep_copy(), [])
            self._seqs[key] = seq
        new = history[len(seq.consumed):]
        if new and not seq.matcher.consume_tokens(new):
            del self._seqs[key]
            raise ValueError(f"response_format: the generated tokens do not follow the "
                             f"grammar: {_error(seq.matcher)}")
        seq.consumed.extend(new)
        return seq.matcher
