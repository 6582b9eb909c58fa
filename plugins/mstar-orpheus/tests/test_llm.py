"""Orpheus' LM against transformers' `LlamaForCausalLM` on the same files, its weight map
against the real 3B layout, and the tiny tokenizer's prompt ids.

Ours runs as the runtime runs it: the module loaded through `mstar.weights` from the files
the tiny checkpoint writer produced, on hand-built ragged `ForwardBatch`es over a real paged
KV cache and the reference attention backend. transformers is imported where the oracle is
used: the tensor-parallel test's rank processes import this module and need no oracle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.model import config_from_fields
from mstar.model.forward import ForwardBatch, Segment, SeqChunk, SeqKey
from mstar.weights.loader import WeightLoadError, iter_checkpoint, load_weights
from mstar.weights.sources import checkpoint_files, read_checkpoint_config
from mstar_orpheus.checkpoint import llama_config_json, write_lm, write_tokenizer
from mstar_orpheus.config import PRESETS, PROMPT_END, START_OF_HUMAN, OrpheusConfig
from mstar_orpheus.llm import OrpheusLLM, kv_spec, llm_weight_spec
from mstar_orpheus.tokenizer import BOS, PACKAGED_TOKENIZER, load_tokenizer

torch.set_num_threads(1)
ATOL = 1e-4
DECODE_STEPS = 8


def config_from(checkpoint: Path) -> OrpheusConfig:
    """OrpheusConfig from the checkpoint's config.json (its fields, by name)."""
    return config_from_fields(OrpheusConfig, read_checkpoint_config(checkpoint))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[bool, Path]:
    """The tiny LM + tokenizer, with tied embeddings (the real layout) and without."""
    out = {}
    for tied in (True, False):
        config = dataclasses.replace(OrpheusConfig(**PRESETS["tiny"]),
                                     tie_word_embeddings=tied)
        out[tied] = write_tokenizer(write_lm(tmp_path_factory.mktemp("orpheus"), config))
    return out


def load_ours(checkpoint: Path, tp_rank: int = 0, tp_size: int = 1,
              tp_group: object = None) -> OrpheusLLM:
    """Our LM (rank `tp_rank` of `tp_size`) loaded from the files by its weight spec."""
    config = config_from(checkpoint)
    module = OrpheusLLM(config, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
    spec = llm_weight_spec(config)
    load_weights(module, iter_checkpoint(checkpoint_files(checkpoint, spec.patterns)), spec,
                 tp_rank=tp_rank, tp_size=tp_size)
    return module.eval()


def orpheus_prompt(tokenizer, voice: str, text: str) -> list[int]:
    """The authors' prompt: [START_OF_HUMAN] + tokenizer(f"{voice}: {text}") + PROMPT_END."""
    return [START_OF_HUMAN] + tokenizer(f"{voice}: {text}").input_ids + list(PROMPT_END)


def step(module: OrpheusLLM, cache: KVCacheManager,
         chunks: list[tuple[SeqKey, list[int], bool]]) -> list[torch.Tensor | None]:
    """One engine step over (sequence, new ids, wants logits) chunks, ragged; returns each
    chunk's last-token logits (None where not wanted)."""
    seqs, ids, positions, start = [], [], [], 0
    for key, new, want in chunks:
        if not cache.has(key):
            cache.create(key)
        cache.reserve(key, len(new))
        done = cache.length(key)
        seqs.append(SeqChunk(key=key, start=start, length=len(new), context_len=done,
                             segments=[Segment(len(new))], is_last_chunk=want,
                             outputs={"logits": (len(new) - 1, 1)} if want else {}))
        ids += new
        positions.append(torch.arange(done, done + len(new)))
        start += len(new)
    batch = ForwardBatch(input_ids=torch.tensor(ids), positions=torch.cat(positions), seqs=seqs)
    outs = forward_step(module, batch, cache)
    return [out["logits"][0] if want else None for out, (_, _, want) in zip(outs, chunks)]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lm_matches_llama_over_chunked_prefill_and_greedy_decode(
        checkpoints: dict[bool, Path], tied: bool) -> None:
    """Two requests share every step: one prefills in two chunks, the other joins the
    second step; then both decode greedily. Each step's logits are transformers' (recomputed
    from scratch over the whole sequence) within 1e-4."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    checkpoint = checkpoints[tied]
    tokenizer = load_tokenizer(checkpoint)
    oracle = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ours = load_ours(checkpoint)
    assert oracle.config.tie_word_embeddings == ours.config.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == \
        ours.config.tie_word_embeddings
    torch.testing.assert_close(ours.rotary.inv_freq, oracle.model.rotary_emb.inv_freq,
                               atol=0, rtol=1e-6)  # llama3-scaled, as the oracle's

    spec = kv_spec(ours.config)
    cache = KVCacheManager(PagePool(spec, num_pages=32, page_size=4))
    a, b = SeqKey("a", "LLM"), SeqKey("b", "LLM")
    seq = {a: orpheus_prompt(tokenizer, "tara", "Hey there, how are you?"),
           b: orpheus_prompt(tokenizer, "leo", "Hello!")}
    assert step(ours, cache, [(a, seq[a][:5], False)]) == [None]
    logits = dict(zip((a, b), step(ours, cache, [(a, seq[a][5:], True), (b, seq[b], True)])))
    for i in range(DECODE_STEPS + 1):
        for key, got in logits.items():
            with torch.no_grad():
                want = oracle(torch.tensor([seq[key]])).logits[0, -1]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0,
                                       msg=f"{key.request_id}: logits differ at step {i}")
            seq[key].append(int(got.argmax()))
        if i < DECODE_STEPS:
            logits = dict(zip((a, b), step(ours, cache, [(k, seq[k][-1:], True)
                                                        for k in (a, b)])))
    assert cache.length(a) == len(seq[a]) - 1 and cache.length(b) == len(seq[b]) - 1


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_3b_weight_map_covers_the_hub_keys_both_ways(tp_rank: int, tp_size: int) -> None:
    """The real 3B config on the meta device: every key transformers' Llama stores (the
    tied head left out, as the hub checkpoint leaves it out) loads into exactly one of our
    parameters at its unsharded shape, and every parameter of ours is loaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = OrpheusConfig(**PRESETS["3b"])
    assert config.tie_word_embeddings and config.vocab_size == 156940
    with torch.device("meta"):
        oracle = LlamaForCausalLM(LlamaConfig(**llama_config_json(config)))
        ours = OrpheusLLM(config, tp_rank=tp_rank, tp_size=tp_size)
    hub = {k: v for k, v in oracle.state_dict().items()
           if k not in oracle.all_tied_weights_keys}
    assert "lm_head.weight" not in hub and len(hub) == 2 + 9 * config.num_hidden_layers
    report = load_weights(ours, hub.items(), llm_weight_spec(config), tp_rank=tp_rank,
                          tp_size=tp_size)
    assert set(report.loaded) == set(ours.state_dict())
    assert report.ignored == []
    if tp_size > 1:
        attn = ours.model.layers[0].self_attn
        assert (attn.heads, attn.kv_heads) == (12, 4)
        assert attn.q_proj.weight.shape == (12 * 128, 3072)

    # A key the map cannot place, or a missing one, is an error, not a silent skip.
    broken = dict(hub)
    broken["model.layers.0.self_attn.q_norm.weight"] = broken.pop("model.norm.weight")
    with pytest.raises(WeightLoadError, match="q_norm") as err:
        load_weights(ours, broken.items(), llm_weight_spec(config), tp_rank=tp_rank,
                     tp_size=tp_size)
    assert err.value.missing == ["model.norm.weight"]


def test_untied_3b_loads_its_own_head() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dataclasses.replace(OrpheusConfig(), tie_word_embeddings=False)
    with torch.device("meta"):
        oracle = LlamaForCausalLM(LlamaConfig(**llama_config_json(config)))
        ours = OrpheusLLM(config)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    report = load_weights(ours, oracle.state_dict().items(), llm_weight_spec(config))
    assert "lm_head.weight" in report.loaded and set(report.loaded) == set(ours.state_dict())


def test_tokenizer_prompt_starts_with_bos_and_round_trips(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    ids = tokenizer.encode("tara: hello")
    assert ids[0] == BOS == 128000 and BOS not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "tara: hello"
    # Text the BPE never saw still round-trips (byte level), and specials keep real ids.
    text = "zoe: Ünïcode & numbers 1234?"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    prompt = orpheus_prompt(tokenizer, "tara", "hello")
    assert prompt[:2] == [START_OF_HUMAN, BOS] and prompt[-4:] == list(PROMPT_END)
    assert tokenizer.decode(prompt, skip_special_tokens=False) == (
        "<custom_token_3><|begin_of_text|>tara: hello<|eot_id|><custom_token_4>"
        "<custom_token_5><custom_token_1>")
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == PROMPT_END[0]


def greedy_logits(module: OrpheusLLM, tp_size: int, prompt: list[int], steps: int
                  ) -> torch.Tensor:
    """Prefill `prompt`, then `steps` greedy decode steps: every step's logits, stacked.
    A TP rank's cache holds its share of the KV heads, as the engine sizes it."""
    spec = kv_spec(module.config)
    spec = dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // tp_size)
    cache = KVCacheManager(PagePool(spec, num_pages=16, page_size=4))
    key = SeqKey("r", "LLM")
    out = step(module, cache, [(key, prompt, True)])
    for _ in range(steps):
        out += step(module, cache, [(key, [int(out[-1].argmax())], True)])
    return torch.stack(out)


def _tp_rank(rank: int, checkpoints: dict[bool, Path], prompt: list[int], out: Path) -> None:
    """One rank of a 2-way TP group (gloo, a file rendezvous): its logits for each
    checkpoint to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=2)
    try:
        for tied, checkpoint in checkpoints.items():
            module = load_ours(checkpoint, tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
            torch.save(greedy_logits(module, 2, prompt, 3), out / f"{tied}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_match_one_rank(checkpoints: dict[bool, Path],
                                              tmp_path: Path) -> None:
    """tp_size 2 over two real processes: each rank holds half the heads, MLP features and
    vocabulary (a tied head shares its rank's embedding rows), and both ranks produce the
    single-rank logits."""
    prompt = orpheus_prompt(load_tokenizer(checkpoints[True]), "tara", "Hello there!")
    mp.spawn(_tp_rank, args=(checkpoints, prompt, tmp_path), nprocs=2, join=True)
    for tied, checkpoint in checkpoints.items():
        want = greedy_logits(load_ours(checkpoint), 1, prompt, 3)
        for rank in range(2):
            got = torch.load(tmp_path / f"{tied}-rank{rank}.pt")
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0,
                                       msg=f"tied={tied}, rank {rank}")


def test_packaged_tokenizer_is_the_written_one(tmp_path: Path) -> None:
    """The tokenizer shipped for runs without a checkpoint is what `write_tokenizer` writes
    (regenerate it with `write_tokenizer(PACKAGED_TOKENIZER)` if this fails)."""
    written = write_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((PACKAGED_TOKENIZER / name).read_text()) == \
            json.loads((written / name).read_text()), name
    assert load_tokenizer(PACKAGED_TOKENIZER).encode("tara: hello")[0] == BOS
