"""The paged KV cache: allocation, copy-on-write forks, truncation, migration, capacity."""

import math

import pytest
import torch

from mstar.engine.kv_cache import (
    KVCacheManager,
    OutOfPages,
    PagePool,
    pages_for_completions,
    plan_capacity,
)
from mstar.model.contract import KVSpec
from mstar.model.forward import SeqKey

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4)
PAGE = 4


def manager(num_pages: int = 16) -> KVCacheManager:
    return KVCacheManager(PagePool(SPEC, num_pages=num_pages, page_size=PAGE))


def key(rid: str = "r", label: str = "main", child: int = 0) -> SeqKey:
    return SeqKey(request_id=rid, node="llm", label=label, child=child)


def append(m: KVCacheManager, k: SeqKey, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reserve, write random K/V for `n` tokens in every layer, commit; return what was
    written as [layers, n, KVH, D] each."""
    g = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_layers, n, SPEC.num_kv_heads, SPEC.head_dim)
    kk, vv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    m.reserve(k, n)
    slots = m.slots(k, m.length(k), n)
    for layer in range(SPEC.num_layers):
        m.write(layer, slots, kk[layer], vv[layer])
    m.commit(k, n)
    return kk, vv


def contents(m: KVCacheManager, k: SeqKey) -> torch.Tensor:
    """Every layer's K and V of the sequence, [layers, 2, length, KVH, D]."""
    return torch.stack([torch.stack(m.gather(layer, k, m.length(k)))
                        for layer in range(SPEC.num_layers)])


def test_allocate_commit_free_counters_return_to_zero() -> None:
    m = manager()
    a, b = key("a"), key("b")
    m.create(a)
    m.create(b)
    assert m.pages_needed(a, 9) == 3
    ka, va = append(m, a, 9, seed=0)
    append(m, b, 4, seed=1)
    assert (m.length(a), m.capacity(a), m.length(b)) == (9, 12, 4)
    assert m.pool.num_used == 4 and m.pool.num_free == 12
    k0, v0 = m.gather(0, a, 9)
    torch.testing.assert_close(k0, ka[0])
    torch.testing.assert_close(v0, va[0])
    m.reserve(a, 3)  # fits in the partly filled last page: reserved, uncommitted
    assert m.pool.num_used == 4 and m.length(a) == 9
    m.free(a)
    m.free(b)
    assert m.pool.num_used == 0 and m.pool.num_free == 16 and m.keys() == []
    assert all(m.pool.refcount(p) == 0 for p in range(16))


def test_errors_on_misuse() -> None:
    m = manager()
    a = key()
    m.create(a)
    with pytest.raises(ValueError, match="already exists"):
        m.create(a)
    with pytest.raises(KeyError):
        m.length(key("missing"))
    with pytest.raises(ValueError, match="not reserved"):
        m.slots(a, 0, 1)
    with pytest.raises(ValueError, match="cannot commit"):
        m.commit(a, 1)


def test_out_of_pages_leaves_state_unchanged() -> None:
    m = manager(num_pages=4)
    a, b = key("a"), key("b")
    m.create(a)
    m.create(b)
    append(m, a, 10, seed=0)  # 3 pages
    before = (m.page_table(a), m.pool.num_free)
    with pytest.raises(OutOfPages):
        m.reserve(b, 5)  # needs 2, 1 free
    with pytest.raises(OutOfPages):
        m.reserve(a, 7)  # needs 2 more
    assert (m.page_table(a), m.pool.num_free) == before
    assert m.page_table(b) == [] and m.length(b) == 0
    # A copy-on-write copy needs a free page too.
    c = key("c")
    m.fork(a, c)
    append(m, b, 4, seed=1)  # takes the last free page
    assert m.pages_needed(c, 1) == 1
    with pytest.raises(OutOfPages):
        m.reserve(c, 1)
    assert m.page_table(c) == m.page_table(a)


def test_fork_shares_pages_and_copies_on_write() -> None:
    m = manager()
    src, dst = key(), key(child=1)
    m.create(src)
    append(m, src, 6, seed=0)  # one full page, one half-full
    m.fork(src, dst)
    pages = m.page_table(src)
    assert m.page_table(dst) == pages and m.length(dst) == 6
    assert [m.pool.refcount(p) for p in pages] == [2, 2]
    assert m.pool.num_used == 2
    before = contents(m, src)

    # The fork writes into the shared half page: it gets its own copy; the source is intact.
    assert m.pages_needed(dst, 1) == 1
    with pytest.raises(RuntimeError, match="shared page"):
        m.slots(dst, 6, 1)
    append(m, dst, 1, seed=1)
    assert m.page_table(dst)[0] == pages[0] and m.page_table(dst)[1] != pages[1]
    assert [m.pool.refcount(p) for p in pages] == [2, 1]
    torch.testing.assert_close(contents(m, src), before)
    torch.testing.assert_close(contents(m, dst)[:, :, :6], before)

    # And the other way round: a second fork, then the source writes.
    other = key(child=2)
    m.fork(src, other)
    forked = contents(m, other)
    append(m, src, 3, seed=2)
    assert m.page_table(src)[1] != m.page_table(other)[1]
    torch.testing.assert_close(contents(m, other), forked)
    torch.testing.assert_close(contents(m, src)[:, :, :6], before)

    # A write on a fresh page after a full shared page needs no copy.
    full = key(child=3)
    m.fork(src, full, length=4)
    assert m.pages_needed(full, 4) == 1 and m.length(full) == 4
    for k in m.keys():
        m.free(k)
    assert m.pool.num_used == 0


def test_fork_into_another_label_and_partial_length() -> None:
    m = manager()
    src = key()
    m.create(src)
    ks, vs = append(m, src, 10, seed=0)
    cfg = key(label="cfg_text", child=1)
    m.fork(src, cfg, length=5)
    assert m.length(cfg) == 5 and m.page_table(cfg) == m.page_table(src)[:2]
    kk, vv = m.gather(1, cfg, 5)
    torch.testing.assert_close(kk, ks[1, :5])
    torch.testing.assert_close(vv, vs[1, :5])
    assert m.keys("r") == [src, cfg]
    with pytest.raises(ValueError, match="cannot fork"):
        m.fork(src, key(child=9), length=11)


def test_truncate_releases_pages() -> None:
    m = manager()
    a = key()
    m.create(a)
    ka, _ = append(m, a, 10, seed=0)
    m.reserve(a, 6)  # capacity 16: 4 pages
    assert m.pool.num_used == 4
    m.truncate(a, 5)
    assert m.length(a) == 5 and len(m.page_table(a)) == 2 and m.pool.num_used == 2
    torch.testing.assert_close(m.gather(0, a, 5)[0], ka[0, :5])
    # A truncated fork releases only its references; shared pages stay with the source.
    b = key(child=1)
    m.fork(a, b)
    m.truncate(b, 0)
    assert m.page_table(b) == [] and m.pool.num_used == 2
    assert [m.pool.refcount(p) for p in m.page_table(a)] == [1, 1]


def test_free_request_frees_every_sequence_of_it() -> None:
    m = manager()
    main, other = key("x"), key("y")
    m.create(main)
    m.create(other)
    append(m, main, 5, seed=0)
    append(m, other, 3, seed=1)
    m.fork(main, key("x", label="cfg_img"))
    m.fork(main, key("x", child=1), length=2)
    m.free_request("x")
    assert m.keys() == [other] and m.pool.num_used == 1
    m.free_request("y")
    assert m.pool.num_used == 0 and m.pool.num_free == m.pool.num_pages


def test_export_import_round_trip_between_pools() -> None:
    src_m = manager(num_pages=8)
    dst_m = KVCacheManager(PagePool(SPEC, num_pages=6, page_size=3))  # another page size
    filler = key("f")
    dst_m.create(filler)
    dst_m.reserve(filler, 2)  # so the import lands on other page numbers
    a = key()
    src_m.create(a)
    append(src_m, a, 7, seed=0)
    exported = src_m.export(a)
    assert exported.length == 7 and exported.kv.shape == (2, 2, 7, 2, 4)
    dst_m.import_sequence(a, exported)
    assert dst_m.length(a) == 7
    torch.testing.assert_close(contents(dst_m, a), contents(src_m, a))
    torch.testing.assert_close(contents(src_m, a), exported.kv)

    tiny = manager(num_pages=1)
    with pytest.raises(OutOfPages):
        tiny.import_sequence(a, exported)
    assert not tiny.has(a) and tiny.pool.num_used == 0


def test_plan_capacity_explicit_pages() -> None:
    specs = {"thinker": SPEC, "talker": KVSpec(num_layers=1, num_kv_heads=1, head_dim=8)}
    got = plan_capacity(specs, max_seq_len=4096, page_size=16, num_pages=7,
                        memory_fraction=0.5, ranks_sharing_device=1, shares=None,
                        device="cpu", max_num_seqs=1)
    assert got == {"thinker": 7, "talker": 7}


def test_plan_capacity_fraction_and_shares() -> None:
    big = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8)    # 256 bytes per token
    small = KVSpec(num_layers=1, num_kv_heads=1, head_dim=8)  # 64 bytes per token
    assert big.bytes_per_token() == 256 and small.bytes_per_token() == 64
    specs = {"a": big, "b": small}
    common = dict(max_seq_len=64, page_size=16, num_pages=None, device="cpu",
                  max_num_seqs=10**6)
    free = 2**20
    # Default split: by bytes per token x max_seq_len (4:1); 1 MiB * 0.5 / 2 ranks = 256 KiB.
    got = plan_capacity(specs, memory_fraction=0.5, ranks_sharing_device=2, shares=None,
                        free_bytes=free, **common)
    budget = free * 0.5 / 2
    assert got == {"a": int(budget * 0.8 // (256 * 16)), "b": int(budget * 0.2 // (64 * 16))}
    # Shares split the budget as given (normalised); names of other ranks' nodes are ignored.
    got = plan_capacity(specs, memory_fraction=0.5, ranks_sharing_device=2,
                        shares={"a": 1, "b": 3, "elsewhere": 5}, free_bytes=free, **common)
    assert got == {"a": int(budget * 0.25 // (256 * 16)), "b": int(budget * 0.75 // (64 * 16))}
    with pytest.raises(ValueError, match=r"no share for KV node\(s\) \['b'\]"):
        plan_capacity(specs, memory_fraction=0.5, ranks_sharing_device=2, shares={"a": 1},
                      free_bytes=free, **common)
    # The real host memory: a tiny fraction still gives every node its pages.
    got = plan_capacity(specs, memory_fraction=0.01, ranks_sharing_device=1, shares=None,
                        **common)
    assert got["a"] >= math.ceil(64 / 16) and got["b"] >= math.ceil(64 / 16)
    assert abs(got["a"] * 256 / (got["b"] * 64) - 4) < 0.05


def test_plan_capacity_never_exceeds_max_num_seqs_full_sequences() -> None:
    """1 GiB of free memory would give a 256-byte-per-token node 4M tokens; 3 sequences of
    100 tokens in pages of 16 use at most 3 x 7 pages, and that is all it gets."""
    specs = {"a": KVSpec(num_layers=2, num_kv_heads=2, head_dim=8)}
    got = plan_capacity(specs, max_seq_len=100, page_size=16, num_pages=None,
                        memory_fraction=1.0, ranks_sharing_device=1, shares=None,
                        device="cpu", max_num_seqs=3, free_bytes=2**30)
    assert got == {"a": 3 * 7}


def test_plan_capacity_too_small_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"KV cache too small for node 'llm'.*needs 256"):
        plan_capacity({"llm": SPEC}, max_seq_len=4096, page_size=16, num_pages=None,
                      memory_fraction=0.1, ranks_sharing_device=4, shares=None,
                      device="cpu", free_bytes=2**20, max_num_seqs=256)


def test_pages_for_completions_counts_shared_prompt_pages_once() -> None:
    """A 16-token prompt in pages of 4: each completion of 24 tokens holds 39 tokens (10
    pages); forks share the 3 full pages before the prompt's last token."""
    assert pages_for_completions(16, 24, 1, max_seq_len=128, page_size=4) == 10
    assert pages_for_completions(16, 24, 4, max_seq_len=128, page_size=4) == 10 + 3 * 7
    # max_seq_len ends every completion at 32 tokens (8 pages)
    assert pages_for_completions(16, 24, 2, max_seq_len=32, page_size=4) == 8 + 5
    # a page-aligned prompt: its last page holds the last token, each fork copies it
    assert pages_for_completions(8, 1, 3, max_seq_len=128, page_size=4) == 2 + 2 * 1


def test_slot_table_is_each_sequences_slots_with_their_mask() -> None:
    """A batch's slot table (one copy of its page tables) holds, row by row, exactly what
    `slots` gives each sequence, marks those columns valid and no others, and gives each
    row's last slot; writing a shared last page is refused as in `slots`."""
    m = manager()
    a, b, c = key("a"), key("b"), key("c")
    for k, n in ((a, 9), (b, 2), (c, 5)):
        m.create(k)
        append(m, k, n, seed=n)
    lengths = [9, 2, 5]
    table, valid, last = m.slot_table([a, b, c], lengths)
    assert table.shape == valid.shape == (3, 9)
    assert valid.sum(dim=1).tolist() == lengths
    for row, ok, k, n in zip(table, valid, (a, b, c), lengths):
        assert row[:n].tolist() == m.slots(k, 0, n, write=False).tolist()
        assert ok[:n].all()
    assert last.tolist() == [m.slots(k, n - 1, 1, write=False).item()
                             for k, n in zip((a, b, c), lengths)]
    for k in (a, b, c):
        m.reserve(k, 1)
    table, _, last = m.slot_table([a, b, c], [10, 3, 6], write_last=True)
    assert table[0, 9].item() == last[0].item() == m.slots(a, 9, 1).item()
    fork = key("a", child=1)
    m.fork(a, fork)  # shares a's half-full last page
    with pytest.raises(RuntimeError, match="shared page"):
        m.slot_table([fork], [10], write_last=True)
    with pytest.raises(ValueError, match="not reserved"):
        m.slot_table([b], [13])
