"""Incremental detokenising: text as tokens arrive, for any tokenizer with `decode(ids)`.

Decoding each token alone is wrong for most tokenizers (a character may span several
tokens; SentencePiece drops a word's leading space at the start of a decode), so the new
text is the difference between decoding a short window with and without the new tokens,
held back while it ends in U+FFFD (an incomplete character)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """`push(ids)` returns the text those ids complete. The window starts a few tokens back
    (`_prefix`) so that decoding in context gives the same spaces as decoding the whole."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # first id of the decode window
        self._read = 0  # ids up to here have been turned into text
        # Hugging Face tokenizers take `skip_special_tokens`; a plain `decode(ids)` does not
        self._options = _decode_options(tokenizer, skip_special_tokens)
        self._raw_options = _decode_options(tokenizer, False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self._options) if ids else ""

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (what logprobs show)."""
        return self.tokenizer.decode([token_id], **self._raw_options)


def _decode_options(tokenizer: Any, skip_special_tokens: bool) -> dict[str, bool]:
    try:
        parameters = inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        return {}
    takes = "skip_special_tokens" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {"skip_special_tokens": skip_special_tokens} if takes else {}
