"""The oracle of testvla's text path: transformers' `LlamaForCausalLM` loaded from a
checkpoint's Llama keys (expert 0 of the LLM is exactly Llama; images and actions are not).
Tests compare the runtime's tokens and log-probs with it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

#: The checkpoint keys of the Llama part (the `_moe_gen` expert and the heads are not).
LLAMA_KEY = re.compile(r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
                       r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|"
                       r"input_layernorm|post_attention_layernorm)\.weight")


def llama_oracle(checkpoint: str | Path):
    """transformers' Llama with the checkpoint's dims and its Llama weights (float32)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from mstar.weights.sources import read_checkpoint_config
    from mstar_testvla.model import TestVLA

    c = TestVLA.make_config(checkpoint_config=read_checkpoint_config(Path(checkpoint)))
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, dtype=torch.float32)
    llama = LlamaForCausalLM(config).float().eval()
    state = {k: v for k, v in load_file(str(Path(checkpoint) / "model.safetensors")).items()
             if LLAMA_KEY.fullmatch(k)}
    llama.load_state_dict(state, strict=True)
    return llama


@torch.no_grad()
def greedy(llama, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """`max_tokens` greedy tokens after `prompt` (each step recomputed over the whole
    sequence, no cache) and their log-prob rows `[max_tokens, vocab]`."""
    ids, rows = list(prompt), []
    for _ in range(max_tokens):
        logprobs = torch.log_softmax(llama(torch.tensor([ids])).logits[0, -1].float(), -1)
        rows.append(logprobs)
        ids.append(int(torch.argmax(logprobs)))
    return ids[len(prompt):], torch.stack(rows)
