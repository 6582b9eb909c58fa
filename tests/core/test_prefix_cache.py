"""Prefix caching: what a page hash covers, where reuse stops, the LRU of cached pages, and
a KV engine that reuses pages giving the logits of one that computes everything."""

from __future__ import annotations

import pytest
import torch

from mstar.communication import messages as msg
from mstar.config.deployment import DeploymentConfig, SchedulerConfig
from mstar.engine.kv_cache import KVCacheManager, OutOfPages, PagePool
from mstar.engine.kv_engine import KVEngine
from mstar.engine.prefix_cache import page_hashes, reusable_length
from mstar.engine.work import NodeWork
from mstar.graph.primitives import GraphNode
from mstar.model.contract import KVSpec
from mstar.model.forward import Segment, SeqKey
from mstar.model.sampling import SamplingParams

PAGE = 4
N = 12  # three full pages


def inputs(seed: int = 0) -> dict:
    """A chunk of N tokens: ids, 3-axis positions, two token extras, one seq extra, and a
    bidirectional segment over tokens 4..7 (the second page)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (N,), generator=g),
        "positions": torch.arange(N).repeat(3, 1),
        "segments": [Segment(4), Segment(4, "bidirectional"), Segment(4)],
        "token_extras": {"media": torch.randn(N, 3, generator=g),
                         "expert": torch.zeros(N, dtype=torch.long)},
        "seq_extras": {"t": torch.tensor([0.5])},
        "salt": "LLM|main|torch.float32",
    }


def hashes(x: dict) -> list[bytes]:
    return page_hashes(x["input_ids"], x["positions"], x["segments"], x["token_extras"],
                       x["seq_extras"], page_size=PAGE, salt=x["salt"])


def changed(where: str, token: int) -> dict:
    """`inputs()` with one covered input changed at `token` (or everywhere for the salt and
    the sequence extra)."""
    x = inputs()
    if where == "token":
        x["input_ids"][token] += 1
    elif where == "position":
        x["positions"][2, token] += 1  # one axis only
    elif where == "extra_row":
        x["token_extras"]["media"][token, 1] += 1e-3
    elif where == "int_extra":
        x["token_extras"]["expert"][token] = 1
    elif where == "seq_extra":
        x["seq_extras"]["t"] = torch.tensor([0.25])
    elif where == "label":
        x["salt"] = "LLM|uncond|torch.float32"
    elif where == "node":
        x["salt"] = "Talker|main|torch.float32"
    elif where == "segments":  # the bidirectional segment ends one token later
        x["segments"] = [Segment(4), Segment(5, "bidirectional"), Segment(3)]
    return x


def test_equal_inputs_equal_hashes_one_per_full_page() -> None:
    base = hashes(inputs())
    assert len(base) == N // PAGE and len(set(base)) == len(base)
    assert hashes(inputs()) == base
    short = inputs()
    short["input_ids"] = short["input_ids"][:N - 1]
    short["positions"] = short["positions"][:, :N - 1]
    short["token_extras"] = {k: v[:N - 1] for k, v in short["token_extras"].items()}
    short["segments"] = [Segment(4), Segment(4, "bidirectional"), Segment(3)]
    assert hashes(short) == base[:2]  # a partial page gets no hash


@pytest.mark.parametrize("where", ["token", "position", "extra_row", "int_extra"])
def test_a_token_level_change_changes_its_page_and_every_later_one(where: str) -> None:
    base = hashes(inputs())
    got = hashes(changed(where, token=9))  # third page
    assert got[:2] == base[:2] and got[2] != base[2]
    got = hashes(changed(where, token=1))  # first page: the chain carries it on
    assert all(a != b for a, b in zip(got, base))


@pytest.mark.parametrize("where", ["seq_extra", "label", "node"])
def test_a_sequence_level_change_changes_every_page(where: str) -> None:
    assert all(a != b for a, b in zip(hashes(changed(where, 0)), hashes(inputs())))


def test_segment_layout_is_covered_but_causal_splits_are_not() -> None:
    base = hashes(inputs())
    # Where the bidirectional segment ends changes the K/V of all its tokens.
    got = hashes(changed("segments", 0))
    assert got[0] == base[0] and got[1] != base[1]
    # Causal tokens attend to everything before them whatever segment they are in.
    split = inputs()
    split["segments"] = [Segment(2), Segment(2), Segment(4, "bidirectional"), Segment(1),
                         Segment(3)]
    assert hashes(split) == base
    # The same tokens as one causal run are different K/V on the second page.
    causal = inputs()
    causal["segments"] = [Segment(N)]
    got = hashes(causal)
    assert got[0] == base[0] and got[1] != base[1]


def test_reuse_stops_before_the_last_token_and_outside_bidirectional_segments() -> None:
    segs = [Segment(6), Segment(8, "bidirectional"), Segment(3)]  # bidirectional 6..14
    assert reusable_length(16, segs, limit=16, page_size=PAGE) == 16  # segment whole
    assert reusable_length(12, segs, limit=16, page_size=PAGE) == 4  # inside: back to 6, 4
    assert reusable_length(16, segs, limit=13, page_size=PAGE) == 4  # output at 13
    assert reusable_length(16, [Segment(16)], limit=15, page_size=PAGE) == 12  # last token
    assert reusable_length(16, [Segment(17)], limit=16, page_size=PAGE) == 16
    # Aligning down may land inside an earlier segment: cut again.
    segs = [Segment(2), Segment(3, "bidirectional"), Segment(11, "bidirectional")]
    assert reusable_length(8, segs, limit=15, page_size=PAGE) == 0
    assert reusable_length(0, segs, limit=15, page_size=PAGE) == 0


# -- the cache manager -----------------------------------------------------------------------

SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2)


def key(rid: str) -> SeqKey:
    return SeqKey(rid, "LLM")


def filled(m: KVCacheManager, rid: str, pages: int, value: float) -> list[int]:
    """A committed sequence of `pages` full pages holding `value`, registered under
    hashes named after `rid`."""
    k = key(rid)
    m.create(k)
    m.reserve(k, pages * PAGE)
    slots = m.slots(k, 0, pages * PAGE)
    kv = torch.full((pages * PAGE, 1, 2), value)
    m.write(0, slots, kv, kv)
    m.commit(k, pages * PAGE)
    assert m.register(k, [f"{rid}{i}".encode() for i in range(pages)]) == pages
    return m.page_table(k)


def test_freed_hashed_pages_stay_cached_and_are_evicted_last_and_lru() -> None:
    m = KVCacheManager(PagePool(SPEC, num_pages=8, page_size=PAGE))
    a = filled(m, "a", 2, 1.0)
    b = filled(m, "b", 2, 2.0)
    m.free(key("a"))
    m.free(key("b"))
    pool = m.pool
    assert pool.num_used == 0 and pool.num_free == 8 and pool.num_cached == 4
    assert m.match_prefix([b"a0", b"a1", b"zz"]) == a
    # Never-cached pages go first.
    m.create(key("c"))
    m.reserve(key("c"), 4 * PAGE)
    assert not set(m.page_table(key("c"))) & set(a + b) and pool.num_cached == 4
    # Then the least recently released, each sequence's tail before its head.
    m.reserve(key("c"), 7 * PAGE)  # (nothing committed: 3 more pages)
    assert m.page_table(key("c"))[4:] == [a[1], a[0], b[1]]
    assert m.match_prefix([b"a0"]) == [] and m.match_prefix([b"b0", b"b1"]) == [b[0]]
    with pytest.raises(OutOfPages):
        m.reserve(key("c"), 9 * PAGE)
    m.free(key("c"))
    assert pool.num_free == 8


def test_adopted_pages_are_shared_and_never_written() -> None:
    m = KVCacheManager(PagePool(SPEC, num_pages=8, page_size=PAGE))
    a = filled(m, "a", 2, 1.0)
    m.create(key("b"))
    m.adopt(key("b"), m.match_prefix([b"a0", b"a1"]))
    assert m.length(key("b")) == 2 * PAGE and [m.pool.refcount(p) for p in a] == [2, 2]
    m.free(key("a"))
    # Rolling back into a cached page and writing there copies it first, even unshared.
    m.truncate(key("b"), PAGE + 1)
    assert m.pages_needed(key("b"), 1) == 1
    m.reserve(key("b"), 1)
    new = m.page_table(key("b"))[1]
    assert new != a[1] and m.pool.refcount(a[1]) == 0 and m.pool.num_cached == 1
    m.write(0, m.slots(key("b"), PAGE + 1, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    k, _ = m.pool.flat(0)
    assert torch.equal(k[a[1] * PAGE:(a[1] + 1) * PAGE], torch.ones(PAGE, 1, 2))
    with pytest.raises(RuntimeError, match="shared page"):
        m.slots(key("b"), 0, 1)  # page 0 is cached: writing it would corrupt the cache
    m.free(key("b"))
    assert m.pool.num_used == 0



def test_a_sequence_continues_on_cached_pages_and_can_give_them_back() -> None:
    m = KVCacheManager(PagePool(SPEC, num_pages=8, page_size=PAGE))
    a = filled(m, "a", 3, 1.0)
    m.create(key("b"))
    m.reserve(key("b"), PAGE + 2)
    m.commit(key("b"), PAGE + 2)  # one full page and two tokens of the next
    own = m.page_table(key("b"))
    # The partly filled page is detached (its tokens are the first of a[1]'s), not freed.
    detached = m.adopt(key("b"), a[1:])
    assert detached == own[1] and m.pool.refcount(detached) == 1
    assert m.page_table(key("b")) == [own[0], *a[1:]] and m.length(key("b")) == 3 * PAGE
    assert [m.pool.refcount(p) for p in a] == [1, 2, 2]
    m.unadopt(key("b"), PAGE + 2, detached)
    assert m.page_table(key("b")) == own and m.length(key("b")) == PAGE + 2
    assert [m.pool.refcount(p) for p in a] == [1, 1, 1]
    with pytest.raises(ValueError, match="reserved pages"):
        m.reserve(key("b"), PAGE)
        m.adopt(key("b"), a[2:])
    m.free(key("a"))
    m.free(key("b"))
    assert m.pool.num_used == 0

# -- the engine on the testvla LLM -------------------------------------------------------------


def engine(llm, prefix_caching: bool) -> KVEngine:
    model, module = llm
    spec = model.kv_spec("LLM")
    return KVEngine("LLM", module, spec, KVCacheManager(PagePool(spec, 32, PAGE)),
                    max_seq_len=64, scheduler=SchedulerConfig(), prefix_caching=prefix_caching)


def prompt(llm, media_seed: int, tail_seed: int | None = None) -> dict:
    """6 text tokens, an 8-token bidirectional media segment (tokens 6..13; with
    `tail_seed`, its last two rows differ), 3 text tokens."""
    from mstar_testvla.tokenizer import IMG

    model, _ = llm
    hidden = model.config.expert_hidden
    media = torch.zeros(17, hidden)
    media[6:14] = torch.randn(8, hidden, generator=torch.Generator().manual_seed(media_seed))
    if tail_seed is not None:
        media[12:14] = torch.randn(2, hidden,
                                   generator=torch.Generator().manual_seed(tail_seed))
    ids = torch.tensor([1, 40, 41, 42, 43, 44] + [IMG] * 8 + [50, 51, 52])
    expert = torch.zeros(17, dtype=torch.long)
    expert[6:14] = 1
    return {"input_ids": ids, "positions": torch.arange(17).repeat(3, 1),
            "segments": [(6, "causal"), (8, "bidirectional"), (3, "causal")],
            "media_embeds": media, "expert_ids": expert}


def logits(e: KVEngine, rid: str, inputs: dict, *, release: bool = True) -> torch.Tensor:
    """Append `inputs` to the sequence of `rid`: the logits of its last token."""
    node = GraphNode("LLM", inputs=tuple(inputs), outputs=("logits",))
    e.submit(NodeWork(rid, 0, node, inputs, seed=0, sampling=SamplingParams()))
    for _ in range(10):
        for result in e.step():
            assert result.error is None, result.error
            if release:
                e.release(rid)
            return result.outputs["logits"]
    raise AssertionError("no result")


def test_engine_reuses_whole_segments_only_and_matches_full_recompute(llm) -> None:
    cached, plain = engine(llm, True), engine(llm, False)
    a, same, tail = prompt(llm, 1), prompt(llm, 1), prompt(llm, 1, tail_seed=2)
    torch.testing.assert_close(logits(cached, "a", a), logits(plain, "a", a), rtol=0, atol=0)
    assert cached.counters == {"prompt_tokens_computed": 17, "prefix_cache_hit_tokens": 0,
                               "kv_tokens_imported": 0, "preemptions": 0,
                               "batched_prompts": 0, "batched_scratch_chunks": 0}
    # The same prompt (its first holder released): every full page but the last token's.
    want = logits(plain, "same", same)
    torch.testing.assert_close(logits(cached, "same", same), want, rtol=1e-6, atol=1e-6)
    assert cached.counters == {"prompt_tokens_computed": 18, "prefix_cache_hit_tokens": 16,
                               "kv_tokens_imported": 0, "preemptions": 0,
                               "batched_prompts": 0, "batched_scratch_chunks": 0}
    # The media's last rows differ: pages 0..2 hash equal (same ids, positions, rows up to
    # 11), but the segment's K/V depend on its tail, so only page 0 (before it) is reused.
    want = logits(plain, "tail", tail)
    torch.testing.assert_close(logits(cached, "tail", tail), want, rtol=1e-6, atol=1e-6)
    assert cached.counters == {"prompt_tokens_computed": 31, "prefix_cache_hit_tokens": 20,
                               "kv_tokens_imported": 0, "preemptions": 0,
                               "batched_prompts": 0, "batched_scratch_chunks": 0}
    assert plain.counters == {"prompt_tokens_computed": 51, "prefix_cache_hit_tokens": 0,
                               "kv_tokens_imported": 0, "preemptions": 0,
                               "batched_prompts": 0, "batched_scratch_chunks": 0}
    assert cached.pages_in_use() == 0 and cached.cache.pool.num_cached > 0



def test_a_later_chunk_of_a_prompt_continues_on_cached_pages(llm) -> None:
    """A prompt prefilled item by item (BAGEL: an image, then its text, one walk each): the
    second chunk of a repeated prompt adopts the cached pages past the first chunk's end,
    the first chunk's partly filled last page included, with the logits of no cache."""
    cached, plain = engine(llm, True), engine(llm, False)
    text = {"input_ids": torch.arange(60, 70), "positions": torch.arange(17, 27).repeat(3, 1)}

    def both(e: KVEngine, rid: str) -> torch.Tensor:
        logits(e, rid, prompt(llm, 1), release=False)  # 17 tokens: 4 pages and 1 token
        return logits(e, rid, text)

    want = both(plain, "ref")
    torch.testing.assert_close(both(cached, "a"), want, rtol=0, atol=0)
    assert cached.counters["prompt_tokens_computed"] == 17  # (a sequence's first chunk)
    assert cached.counters["prefix_cache_hit_tokens"] == 0
    torch.testing.assert_close(both(cached, "b"), want, rtol=1e-6, atol=1e-6)
    # The first chunk: its 4 full pages (the last token runs). The second: the pages up to
    # token 24 (page 4 starts with the first chunk's last token); its last 3 tokens run.
    assert cached.counters["prefix_cache_hit_tokens"] == 16 + 7
    assert cached.counters["prompt_tokens_computed"] == 17 + 1
    assert cached.pages_in_use() == 0

def test_prefix_caching_is_on_by_default() -> None:
    on = DeploymentConfig(model="testvla")
    off = DeploymentConfig(model="testvla", kv_cache={"enable_prefix_caching": False})
    assert on.kv_cache.enable_prefix_caching and on.encoder_cache_bytes == 256 * 2**20
    assert not off.kv_cache.enable_prefix_caching


def test_a_tensor_parallel_follower_adopts_allocates_and_evicts_as_its_leader(llm) -> None:
    """A leader's every step and cache operation replayed by a follower (the same module
    here, so its K/V must come out bitwise equal): with prefix hits, preemption in a pool
    too small for the three prompts at once, and evictions of cached pages (in an order the
    follower's own allocator would not choose: it takes the leader's pages), the follower's
    page tables, reference counts, cached pages and K/V stay the leader's, and it counts
    the same hits."""
    model, module = llm
    spec = model.kv_spec("LLM")
    leader, follower = (KVEngine("LLM", module, spec, KVCacheManager(PagePool(spec, 12, PAGE)),
                                 max_seq_len=64, scheduler=SchedulerConfig())
                        for _ in range(2))
    leader.tp_ranks = (0, 1)
    leader.mirror = lambda m: (follower.follow(m) if isinstance(m, msg.TPStep)
                               else follower.apply(m))

    def same_state() -> None:
        a, b = leader.cache, follower.cache
        tables = [{k: m.page_table(k) for k in m.keys() if m.page_table(k)} for m in (a, b)]
        assert tables[0] == tables[1]  # (a sequence gets its first pages at its first step)
        pages = range(a.pool.num_pages)
        assert [a.pool.refcount(p) for p in pages] == [b.pool.refcount(p) for p in pages]
        assert [a.pool.prefix.is_hashed(p) for p in pages] == [
            b.pool.prefix.is_hashed(p) for p in pages]
        assert torch.equal(a.pool.kv, b.pool.kv)

    # Each request: a 17-token prompt (5 pages), then two chunks of 4 tokens that need a
    # page each; the media seed picks the prompt (equal seeds: prefix hits).
    rounds = [{"a": 1, "b": 2, "c": 3}, {"a2": 1, "b2": 2}, {"d": 4, "a3": 1},
              {"e": 3, "f": 4, "a4": 1}]
    node = GraphNode("LLM", inputs=("input_ids",), outputs=("logits",))

    def submit(rid: str, inputs: dict) -> None:
        leader.submit(NodeWork(rid, 0, node, inputs, seed=0, sampling=SamplingParams()))

    for seeds in rounds:
        chunks = {rid: [{"input_ids": torch.arange(60, 64)}, {"input_ids": torch.arange(64, 68)}]
                  for rid in seeds}
        for rid, seed in seeds.items():
            submit(rid, prompt(llm, seed))
        while chunks:
            for result in leader.step():
                assert result.error is None, result.error
                rid = result.work.request_id
                if chunks[rid]:
                    submit(rid, chunks[rid].pop(0))
                else:
                    del chunks[rid]
                    leader.release(rid)
            same_state()
    assert leader.counters["preemptions"] > 0 and leader.counters["prefix_cache_hit_tokens"] > 0
    assert follower.counters["prefix_cache_hit_tokens"] == leader.counters[
        "prefix_cache_hit_tokens"]
    assert follower.counters["prompt_tokens_computed"] == leader.counters[
        "prompt_tokens_computed"]
