"""Qwen3-Omni's tokenizer and chat template.

A checkpoint brings its Qwen2-style `tokenizer.json` and its chat template
(`chat_template.json`, or `tokenizer_config.json`'s `chat_template`). Runs without a
checkpoint (dummy weights, the tiny preset) use `PACKAGED_TOKENIZER`: a byte-level BPE of
400 tokens learned from a few sentences (so `system`, `user` and `assistant` are single
tokens, as in Qwen's vocabulary) followed by Qwen3-Omni's special tokens, in
`SPECIAL_TOKENS` order, at the ids the tiny preset names (`config.TINY_IDS`), and
`CHAT_TEMPLATE`, a short template of the real one's shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mstar_qwen3omni.config import TINY_BASE

PACKAGED_TOKENIZER = Path(__file__).with_name("tiny_tokenizer")
#: Qwen3-Omni's special tokens (their order gives the tiny tokenizer's ids).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>",
                  "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
                  "<tts_text_bos_single>", "<|audio_pad|>")
#: The real template's shape: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, each
#: media part as its placeholder between start and end markers, then the assistant's start.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TRAINING_TEXT = (
    "system\nuser\nassistant\n" * 50,  # the role words the Talker's prompt looks for
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech.",
    "What is in this picture? Describe the image in one sentence, please.",
    "What is said in the audio? Transcribe the audio into text.",
    "Why is this video funny? Tell me what happens in the video.",
    "Hello! How are you today? I am fine, thank you. The weather is nice and sunny.",
    "A cat in a hat sits on a red mat, and a dog runs on the beach at sunset.",
)


def load_tokenizer(directory: str | os.PathLike[str] | None) -> Any:
    """The tokenizer of checkpoint `directory` (`tokenizer.json` + `tokenizer_config.json`),
    or the packaged tiny one when `directory` is None or holds none."""
    from transformers import AutoTokenizer

    if directory is None or not (Path(directory) / "tokenizer.json").is_file():
        directory = PACKAGED_TOKENIZER
    return AutoTokenizer.from_pretrained(str(directory))


def load_chat_template(directory: str | os.PathLike[str] | None) -> str:
    """The checkpoint's chat template (`chat_template.json` or `chat_template.jinja`, else
    `tokenizer_config.json`'s), or `CHAT_TEMPLATE` without a checkpoint or a template."""
    if directory is not None:
        path = Path(directory)
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text()
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (path / name).is_file():
                template = json.loads((path / name).read_text()).get("chat_template")
                if isinstance(template, str):
                    return template
    return CHAT_TEMPLATE


def write_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """The tiny tokenizer (`PACKAGED_TOKENIZER`'s files) in `directory`; returns it.
    ValueError when the learned vocabulary does not end where the special ids begin."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAINING_TEXT, trainer=BpeTrainer(
        vocab_size=TINY_BASE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if tok.get_vocab_size() != TINY_BASE:
        raise ValueError(f"the tiny BPE learned {tok.get_vocab_size()} tokens, not "
                         f"{TINY_BASE}: special ids would move")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "clean_up_tokenization_spaces": False, "model_max_length": 65536,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


if __name__ == "__main__":  # python -m mstar_qwen3omni.tokenizer: rewrite the packaged one
    print(write_tokenizer(PACKAGED_TOKENIZER))
