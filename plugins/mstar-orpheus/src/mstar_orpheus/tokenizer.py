"""Orpheus' text tokenizer: the checkpoint's Llama-3 `tokenizer.json`, loaded the way the
authors' engine loads it (`transformers.AutoTokenizer`).

That matters for one token: their prompt is `[START_OF_HUMAN] + tokenizer(f"{voice}:
{text}").input_ids + PROMPT_END`, and the tokenizer's post-processor puts Llama-3's
`<|begin_of_text|>` (128000) in front of the text, so the BOS sits *inside* the human turn.
`encode(text)` (special tokens on by default) reproduces exactly that.

Runs without a checkpoint (dummy weights) use `PACKAGED_TOKENIZER`: the tiny tokenizer that
`mstar_orpheus.checkpoint.write_tokenizer` writes (real special-token ids, a small BPE for
the text), shipped in the package so no download is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BOS = 128000  # <|begin_of_text|>
PACKAGED_TOKENIZER = Path(__file__).with_name("tiny_tokenizer")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer in checkpoint directory `path` (`tokenizer.json` +
    `tokenizer_config.json`): `encode(text) -> ids` starting with BOS, `decode(ids,
    skip_special_tokens=...)`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
