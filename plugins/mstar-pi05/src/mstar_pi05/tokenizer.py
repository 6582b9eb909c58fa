"""Pi0.5's prompt tokenizer: PaliGemma's, with BOS first, never padded.

lerobot's `TokenizerProcessorStep` calls the Hugging Face PaliGemma tokenizer with its
default `add_special_tokens=True`, which puts `<bos>` (id 2) before the text, and then pads
to `tokenizer_max_length`; we encode the text without special tokens and put BOS first
ourselves (the same ids whatever post-processor a `tokenizer.json` declares), and never pad:
each request's prompt is as long as it is (ragged batches are exact).

The real tokenizer is `tokenizer.json` of google/paligemma-3b-pt-224 (gated; lerobot's
checkpoints ship none, so the model's "tokenizer" weight source fetches it). The tiny and
small presets and tiny checkpoints use `PACKAGED_TOKENIZER`: a byte-level BPE of at most
1024 ids learned by `train_tiny_tokenizer` from `TRAINING_TEXT` (Pi0.5's prompt shape, so
"Task:", "State:" and the bin numbers are few tokens), with Gemma's special ids (`<pad>` 0,
`<eos>` 1, `<bos>` 2, `<unk>` 3).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

PACKAGED_TOKENIZER = Path(__file__).with_name("tiny_tokenizer") / "tokenizer.json"
#: Gemma's special tokens at Gemma's ids (their order is the id).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
BOS = "<bos>"
TINY_VOCAB_SIZE = 1024
TRAINING_TEXT = (
    "Task: " + ", ".join(("pick up the red block", "put the cup on the plate",
                          "open the drawer", "close the door", "fold the towel",
                          "move the arm to the left", "stack the blocks", "do something"))
    + ", State: " + " ".join(str(i) for i in range(256)) + ";\nAction: ",
) * 20


class PromptTokenizer:
    """Text -> token ids as lerobot feeds them to Pi0.5: `[<bos>] + ids(text)`."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        bos = tokenizer.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"the tokenizer of {source} has no {BOS} token")
        self._tokenizer, self.bos_token_id, self.source = tokenizer, bos, source

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *self._tokenizer.encode(text, add_special_tokens=False).ids]


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> PromptTokenizer:
    """The tokenizer of `tokenizer.json` at `path`: the file, a directory holding it, or a
    checkpoint directory holding it in its `tokenizer/` subfolder (where a local checkpoint
    keeps the "tokenizer" weight source); the packaged tiny one when `path` is None."""
    file = PACKAGED_TOKENIZER if path is None else Path(path)
    if file.is_dir():
        inside = [file / "tokenizer.json", file / "tokenizer" / "tokenizer.json"]
        file = next((f for f in inside if f.is_file()), inside[0])
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return PromptTokenizer(Tokenizer.from_file(str(file)), str(file))


def train_tiny_tokenizer(out: str | os.PathLike[str] = PACKAGED_TOKENIZER) -> Path:
    """Learn the tiny tokenizer from `TRAINING_TEXT` and save it at `out` (how the packaged
    one was made: `python -m mstar_pi05.tokenizer`)."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAINING_TEXT, trainer=BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))) or tok.get_vocab_size() > TINY_VOCAB_SIZE:
        raise ValueError(f"the tiny BPE has special ids {ids} and {tok.get_vocab_size()} "
                         f"tokens; want {list(range(len(SPECIAL_TOKENS)))} and at most "
                         f"{TINY_VOCAB_SIZE}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


if __name__ == "__main__":  # python -m mstar_pi05.tokenizer: rewrite the packaged one
    print(train_tiny_tokenizer())
