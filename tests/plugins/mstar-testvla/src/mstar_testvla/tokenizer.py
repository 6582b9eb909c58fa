"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then six special ids.

A real model ships a trained tokenizer; bytes keep this test model self-contained and make
incremental decoding non-trivial (one character may span several tokens).
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, IMG, ACT, FRAME, PAD = 256, 257, 258, 259, 260, 261
SPECIAL_IDS = frozenset({BOS, EOS, IMG, ACT, FRAME, PAD})
IMAGE_MARKER = "<image>"


class ByteTokenizer:
    """encode: text -> UTF-8 byte ids; decode: ids -> text, skipping ids that are not bytes."""

    bos_token_id = BOS
    eos_token_id = EOS
    pad_token_id = PAD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes (b"" for the special ids): what grammar-constrained sampling
        (`response_format`) needs to know which ids can continue a text."""
        return [bytes([i]) for i in range(256)] + [b""] * len(SPECIAL_IDS)
