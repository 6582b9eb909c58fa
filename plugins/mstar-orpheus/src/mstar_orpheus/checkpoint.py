"""A tiny Orpheus checkpoint in the real hub layout, for CPU tests.

- `model.safetensors`: the LM under the hub's Llama keys, taken from a seeded
  `transformers.LlamaForCausalLM` (the oracle the tests compare against) and written with
  `safetensors` directly, so the keys are the hub's whatever `save_pretrained` does. With
  tied embeddings `lm_head.weight` is left out, as in the real checkpoint.
- `config.json`: a Llama `config.json` as the hub ships it (`rope_theta` + `rope_scaling`).
- `tokenizer.json` + `tokenizer_config.json`: a byte-level BPE trained in milliseconds on a
  few sentences, whose special tokens carry their real ids (`<|begin_of_text|>` 128000,
  `<|eot_id|>` 128009, `<custom_token_N>` 128256 + N), so prompts have real ids.
- `snac/`: the codec, by `mstar_orpheus.snac.write_tiny_snac` (needs the `snac` package:
  `pip install 'mstar-orpheus[checkpoint]'`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mstar_orpheus.config import CUSTOM_TOKEN_BASE, END_OF_TEXT, PRESETS, OrpheusConfig
from mstar_orpheus.speaking import speaking_weight

#: Llama-3's special tokens that Orpheus prompts and tokenizer configs name.
LLAMA3_SPECIALS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
                   "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                   "<|eot_id|>": END_OF_TEXT}
#: Orpheus' control tokens are <custom_token_0..9>; audio codes start at the 10th.
NUM_CONTROL_TOKENS = 10
TRAINING_TEXT = (
    "tara: Hey there, my name is Tara, and I talk quite a lot.",
    "leah: The quick brown fox jumps over the lazy dog.",
    "leo: Hello, how are you doing today? I am fine, thank you!",
    "zac: Speech tokens stream into the codec while the model speaks.",
)


def llama_config_json(config: OrpheusConfig, dtype: torch.dtype = torch.float32
                      ) -> dict[str, Any]:
    """The LM's `config.json` in the hub's form (the fields transformers reads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": LLAMA3_SPECIALS["<|begin_of_text|>"],
        "eos_token_id": END_OF_TEXT,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": config.rope_scaling,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def _seeded_value(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Scales that keep activations O(1), so logits separate tokens clearly (transformers'
    0.02-std init would make greedy decoding a coin toss between near-equal logits)."""
    x = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name.endswith("embed_tokens.weight"):
        return x
    return x / math.sqrt(shape[-1])


def write_lm(directory: str | Path, config: OrpheusConfig, seed: int = 0) -> Path:
    """`model.safetensors` + `config.json` of the LM in `directory`; returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config_json = llama_config_json(config)
    oracle = LlamaForCausalLM(LlamaConfig(**config_json)).float()
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    # named_parameters lists a tied head once, under the embedding's name.
    for name, param in oracle.named_parameters():
        tensors[name] = _seeded_value(name, param.shape, gen).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return out


def write_tokenizer(directory: str | Path) -> Path:
    """A tiny Llama-3-style tokenizer (byte-level BPE, BOS added by the post-processor) in
    `directory`; returns it. Special tokens sit in the BPE vocabulary at their real ids, so
    both `tokenizers` and transformers give them those ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    def byte_level(model: models.Model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    trained = byte_level(models.BPE())
    trained.train_from_iterator(TRAINING_TEXT, trainer=BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    specials = {**LLAMA3_SPECIALS, **{f"<custom_token_{i}>": CUSTOM_TOKEN_BASE + i
                                      for i in range(NUM_CONTROL_TOKENS)}}
    tok = byte_level(models.BPE(vocab={**learned["vocab"], **specials},
                                merges=[tuple(m) for m in learned["merges"]]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
        special_tokens=[(bos, specials[bos])])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {"bos_token": bos, "eos_token": "<|eot_id|>",
                        "clean_up_tokenization_spaces": False,
                        "model_input_names": ["input_ids", "attention_mask"],
                        "model_max_length": 131072,
                        "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def write_tiny_checkpoint(directory: str | Path, preset: str = "tiny", seed: int = 0, *,
                          speaking: bool = False, **overrides: Any) -> Path:
    """The whole checkpoint of `preset` (config fields replaced by `overrides`) at
    `directory`: LM, tokenizer and `snac/`, the LM made to speak (`make_it_speak`) when
    `speaking`; returns the directory. Written into a temporary sibling renamed at the end,
    so a failure leaves nothing at `directory` (which must not exist, or be empty)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    config = dataclasses.replace(OrpheusConfig(**PRESETS[preset]), **overrides)
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory: remove it or "
                              "choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        write_tokenizer(write_lm(work, config, seed))
        from mstar_orpheus.snac import write_tiny_snac

        write_tiny_snac(work / "snac", config.snac, seed)
        if speaking:
            make_it_speak(work, seed)
        work.chmod(0o755)  # mkdtemp makes it private; a checkpoint is not
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def make_it_speak(directory: str | Path, seed: int = 0) -> None:
    """Lay `mstar_orpheus.speaking`'s structure over the LM of a checkpoint (tied or not),
    so that, random as it is, every token it samples is an audio code of the right frame
    position. For tests and benchmarks of the serving path (frames stream, windows
    decode) with random weights; `--load-format dummy` does the same to dummy weights."""
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    state = {name: speaking_weight(name, tensor, gen).contiguous()
             for name, tensor in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    """`python -m mstar_orpheus.checkpoint DIR [--preset tiny] [--speaking]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny Orpheus checkpoint in the "
                                                 "hub layouts (LM, tokenizer, snac/).")
    parser.add_argument("directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speaking", action="store_true",
                        help="make_it_speak: every token the LM samples is an audio code")
    args = parser.parse_args(argv)
    try:
        out = write_tiny_checkpoint(args.directory, preset=args.preset, seed=args.seed,
                                    speaking=args.speaking)
    except (ImportError, OSError) as err:
        parser.exit(1, f"error: {err}\n")
    print(out)


if __name__ == "__main__":
    main()
