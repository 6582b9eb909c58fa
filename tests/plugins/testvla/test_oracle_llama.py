"""The LLM's text path (expert 0 only) is exactly Llama: checked against transformers'
`LlamaForCausalLM` on the same safetensors file.

Ours runs as the runtime runs it: the node built by the model, weights loaded through
`mstar.weights` from the files, a real paged KV cache, the prompt prefilled in two chunks
and then three greedy decode steps. The plain-torch reference is anchored to the same
oracle, so the other tests may trust it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from mstar.model.forward import SeqKey
from mstar_testvla.checkpoint import write_tiny_checkpoint
from mstar_testvla.oracle import llama_oracle
from testvla import Chunk, load_model, load_node, new_cache, run_llm
from testvla.reference import Reference

ATOL = 1e-4
PROMPT = [256] + list(b"The quick brown fox")  # BOS + 19 bytes = 20 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("testvla"), "tiny", seed=0)


@pytest.fixture(scope="module")
def hf_llama(checkpoint):
    """transformers' Llama with the same dims, loaded from the checkpoint's Llama keys."""
    assert any("_moe_gen" in k for k in load_file(str(checkpoint / "model.safetensors")))
    return llama_oracle(checkpoint)


def hf_last_logits(llama: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llama(torch.tensor([ids])).logits[0, -1]


def text_chunk(key: SeqKey, ids: list[int], start: int, want: tuple[str, ...]) -> Chunk:
    n = len(ids)
    return Chunk(key, {"input_ids": torch.tensor(ids),
                       "positions": torch.arange(start, start + n).repeat(3, 1)}, want)


def test_llm_node_matches_llama_over_chunked_prefill_and_decode(checkpoint, hf_llama):
    torch.manual_seed(0)
    model = load_model(checkpoint)
    llm = load_node(model, "LLM", checkpoint)
    cache = new_cache(model)
    key = SeqKey("req", "LLM")

    first = run_llm(model, llm, cache, [text_chunk(key, PROMPT[:12], 0, ())])[0]
    assert first == {} and cache.length(key) == 12
    out = run_llm(model, llm, cache, [text_chunk(key, PROMPT[12:], 12, ("logits",))])[0]
    ids = list(PROMPT)
    for step in range(4):
        ours = out["logits"][0]
        theirs = hf_last_logits(hf_llama, ids)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0,
                                   msg=f"logits differ from Llama at step {step}")
        if step == 3:
            break
        token = int(torch.argmax(ours))
        out = run_llm(model, llm, cache, [text_chunk(key, [token], len(ids), ("logits",))])[0]
        ids.append(token)
    assert cache.length(key) == len(PROMPT) + 3


def test_reference_matches_llama(checkpoint, hf_llama):
    ref = Reference(checkpoint)
    ids = PROMPT + [104, 105]
    theirs = hf_llama(torch.tensor([ids])).logits[0].detach()
    torch.testing.assert_close(ref.logits(ids), theirs, atol=ATOL, rtol=0)
    tokens, first = ref.generate_text(PROMPT, None, max_tokens=3)
    torch.testing.assert_close(first, theirs[len(PROMPT) - 1], atol=ATOL, rtol=0)
    assert tokens[0] == int(torch.argmax(theirs[len(PROMPT) - 1]))
