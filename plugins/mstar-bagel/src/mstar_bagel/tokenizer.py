"""BAGEL's tokenizer: the checkpoint's Qwen2 tokenizer with the four special tokens BAGEL's
prompts use (the authors' `add_special_tokens`): `<|im_start|>` opens every text chunk and
starts decoding, `<|im_end|>` closes a text and ends decoding, `<|vision_start|>` /
`<|vision_end|>` frame an image's tokens.

Runs without a checkpoint (dummy weights) use `PACKAGED_TOKENIZER`, a byte-level BPE of a
few hundred tokens with the four specials after it, written by `write_tokenizer` and
shipped in the package so no download is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Role of each special token -> its text.
SPECIAL_TOKENS = {"bos": "<|im_start|>", "eos": "<|im_end|>",
                  "start_of_image": "<|vision_start|>", "end_of_image": "<|vision_end|>"}
PACKAGED_TOKENIZER = Path(__file__).with_name("tiny_tokenizer")
TRAINING_TEXT = (
    "A cat in a hat sits on a red mat.",
    "Describe the image: a photo of a dog running on the beach at sunset.",
    "Generate an image of a blue house with a green door and two windows.",
    "What is in this picture? Answer in one sentence, please.",
)


def load_tokenizer(directory: str | os.PathLike[str] | None) -> Any:
    """The tokenizer in checkpoint `directory` (`tokenizer.json` + `tokenizer_config.json`),
    or the packaged tiny one when `directory` is None or has none; its `bagel_ids` maps each
    role of `SPECIAL_TOKENS` to the token's id. ValueError naming a missing special token."""
    from transformers import AutoTokenizer

    if directory is None or not (Path(directory) / "tokenizer.json").is_file():
        directory = PACKAGED_TOKENIZER
    tok = AutoTokenizer.from_pretrained(str(directory))
    vocab = tok.get_vocab()
    missing = [text for text in SPECIAL_TOKENS.values() if text not in vocab]
    if missing:
        raise ValueError(f"the tokenizer in {directory} lacks BAGEL's special tokens "
                         f"{missing}")
    tok.bagel_ids = {role: vocab[text] for role, text in SPECIAL_TOKENS.items()}
    return tok


def write_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """A tiny Qwen2-style tokenizer (byte-level BPE, no BOS added) in `directory`, its
    special tokens right after the learned vocabulary; returns the directory."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAINING_TEXT, trainer=BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS.values()])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": SPECIAL_TOKENS["eos"],
              "pad_token": SPECIAL_TOKENS["eos"], "clean_up_tokenization_spaces": False,
              "model_max_length": 32768, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
