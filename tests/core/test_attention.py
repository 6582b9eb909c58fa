"""The torch attention backend against a dense reference written here: per sequence, the
whole history's K/V and a mask built from token positions and segment ids (a key is visible
when it comes no later than the query, or when both sit in one bidirectional segment)."""

from dataclasses import dataclass, field

import torch

from mstar.engine.attention_torch import TorchAttention
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.model.contract import KVSpec
from mstar.model.forward import (
    ChunkMode,
    Segment,
    SeqChunk,
    SeqKey,
    attention_context,
    current_attention,
)
from mstar.model.ragged import RaggedAttention

LAYERS, D, PAGE = 2, 8, 4
SCALE = D**-0.5
C, B = "causal", "bidirectional"


def make_cache(kv_heads: int = 2, num_pages: int = 32) -> KVCacheManager:
    spec = KVSpec(num_layers=LAYERS, num_kv_heads=kv_heads, head_dim=D)
    return KVCacheManager(PagePool(spec, num_pages=num_pages, page_size=PAGE))


def key(rid: str, child: int = 0) -> SeqKey:
    return SeqKey(request_id=rid, node="llm", child=child)


def segs(*parts: tuple[int, str]) -> list[Segment]:
    return [Segment(n, kind) for n, kind in parts]  # type: ignore[arg-type]


QKV = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per layer: q, k, v


def rand_qkv(n: int, seed: int, heads: int = 2, kv_heads: int = 2) -> QKV:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, heads, D, generator=g), torch.randn(n, kv_heads, D, generator=g),
             torch.randn(n, kv_heads, D, generator=g)) for _ in range(LAYERS)]


@dataclass
class History:
    """What the test itself remembers of a sequence: its K/V and segments, token by token."""

    k: list[torch.Tensor] = field(default_factory=lambda: [torch.empty(0, 2, D)] * LAYERS)
    v: list[torch.Tensor] = field(default_factory=lambda: [torch.empty(0, 2, D)] * LAYERS)
    segments: list[Segment] = field(default_factory=list)

    def extended(self, new: list[Segment], qkv: QKV) -> "History":
        return History([torch.cat([self.k[i], qkv[i][1]]) for i in range(LAYERS)],
                       [torch.cat([self.v[i], qkv[i][2]]) for i in range(LAYERS)],
                       self.segments + new)


def reference_mask(segments: list[Segment]) -> torch.Tensor:
    seg_of = [i for i, s in enumerate(segments) for _ in range(s.length)]
    n = len(seg_of)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            same_block = seg_of[i] == seg_of[j] and segments[seg_of[i]].kind == B
            mask[i, j] = j <= i or same_block
    return mask


def dense(hist: History, new: list[Segment], qkv: QKV) -> list[torch.Tensor]:
    """Per layer `[n, H, D]`: the new tokens' attention over the history and themselves."""
    full = hist.extended(new, qkv)
    ctx = hist.k[0].shape[0]
    mask = reference_mask(full.segments)[ctx:]
    out = []
    for layer in range(LAYERS):
        q = qkv[layer][0]
        rep = q.shape[1] // full.k[layer].shape[1]
        k = full.k[layer].repeat_interleave(rep, dim=1)
        v = full.v[layer].repeat_interleave(rep, dim=1)
        scores = torch.einsum("nhd,mhd->hnm", q, k) * SCALE
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out.append(torch.einsum("hnm,mhd->nhd", probs, v))
    return out


@dataclass
class Chunk:
    key: SeqKey
    context_len: int
    segments: list[Segment]
    qkv: QKV
    mode: ChunkMode = "append"


def step(cache: KVCacheManager | None, chunks: list[Chunk],
         **backend_kw: bool) -> list[list[torch.Tensor]]:
    """One engine step as the engine runs it: reserve, attend every layer through the
    attention context (as PagedAttention does), commit. Returns per chunk, per layer
    `[n, H, D]`."""
    seqs, start = [], 0
    for c in chunks:
        n = sum(s.length for s in c.segments)
        if c.mode == "append" and cache is not None:
            if not cache.has(c.key):
                cache.create(c.key)
            cache.reserve(c.key, n)
        seqs.append(SeqChunk(key=c.key, start=start, length=n, context_len=c.context_len,
                             segments=c.segments, mode=c.mode))
        start += n
    backend = TorchAttention(seqs, cache=cache, **backend_kw)
    outs = []
    with attention_context(backend):
        for layer in range(LAYERS):
            q, k, v = (torch.cat([c.qkv[layer][i] for c in chunks]) for i in range(3))
            outs.append(current_attention().attend(layer, q, k, v, SCALE))
    if cache is not None:
        for c, s in zip(chunks, seqs):
            if c.mode == "append":
                cache.commit(c.key, s.length)
    return [[outs[layer][s.start:s.start + s.length] for layer in range(LAYERS)]
            for s in seqs]


def assert_layers_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_causal_prefill_of_ragged_batch() -> None:
    torch.manual_seed(0)
    cache = make_cache()
    chunks = [Chunk(key(f"r{i}"), 0, segs((n, C)), rand_qkv(n, seed=i))
              for i, n in enumerate([5, 3, 7])]
    outs = step(cache, chunks)
    for c, out in zip(chunks, outs):
        assert_layers_close(out, dense(History(), c.segments, c.qkv))
        assert cache.length(c.key) == sum(s.length for s in c.segments)
        k1, v1 = cache.gather(1, c.key, cache.length(c.key))
        torch.testing.assert_close(k1, c.qkv[1][1])
        torch.testing.assert_close(v1, c.qkv[1][2])


def test_chunked_prefill_equals_one_shot() -> None:
    qkv = rand_qkv(9, seed=1)
    whole = step(make_cache(), [Chunk(key("r"), 0, segs((9, C)), qkv)])[0]
    assert_layers_close(whole, dense(History(), segs((9, C)), qkv))
    cache = make_cache()
    head = [(q[:5], k[:5], v[:5]) for q, k, v in qkv]
    tail = [(q[5:], k[5:], v[5:]) for q, k, v in qkv]
    first = step(cache, [Chunk(key("r"), 0, segs((5, C)), head)])[0]
    second = step(cache, [Chunk(key("r"), 5, segs((4, C)), tail)])[0]
    assert_layers_close([torch.cat([a, b]) for a, b in zip(first, second)], whole)


def test_bidirectional_segment_between_causal_ones() -> None:
    layout = segs((3, C), (4, B), (3, C))  # [text][image][text]
    qkv = rand_qkv(10, seed=2)
    cache = make_cache()
    out = step(cache, [Chunk(key("r"), 0, layout, qkv)])[0]
    want = dense(History(), layout, qkv)
    assert_layers_close(out, want)
    # The image really is bidirectional: its first token sees its last one.
    causal = dense(History(), segs((10, C)), qkv)
    assert not torch.allclose(want[0][3], causal[0][3])
    # Split at the segment boundary (a bidirectional segment is never split): same result.
    cache2 = make_cache()
    head = [(q[:7], k[:7], v[:7]) for q, k, v in qkv]
    tail = [(q[7:], k[7:], v[7:]) for q, k, v in qkv]
    first = step(cache2, [Chunk(key("r"), 0, layout[:2], head)])[0]
    second = step(cache2, [Chunk(key("r"), 7, layout[2:], tail)])[0]
    assert_layers_close([torch.cat([a, b]) for a, b in zip(first, second)], want)


def test_scratch_chunk_attends_to_prefix_and_itself_and_leaves_cache_untouched() -> None:
    cache = make_cache()
    prefix = rand_qkv(6, seed=3)
    other = rand_qkv(2, seed=4)
    step(cache, [Chunk(key("r"), 0, segs((6, C)), prefix)])
    hist = History().extended(segs((6, C)), prefix)
    pool_before, used_before = cache.pool.kv.clone(), cache.pool.num_used

    block = rand_qkv(4, seed=5)
    outs = step(cache, [Chunk(key("r"), 6, segs((4, B)), block, mode="scratch"),
                        Chunk(key("o"), 0, segs((2, C)), other)])
    assert_layers_close(outs[0], dense(hist, segs((4, B)), block))
    assert_layers_close(outs[1], dense(History(), segs((2, C)), other))
    assert cache.length(key("r")) == 6 and cache.page_table(key("r")) == [0, 1]
    # Only the appended sequence's pages changed.
    changed = (cache.pool.kv != pool_before).flatten(3).any(-1).any(0).any(0)
    assert set(changed.nonzero().flatten(0).tolist()) == set(cache.page_table(key("o")))
    assert cache.pool.num_used == used_before + 1


def test_gqa_with_cached_context() -> None:
    cache = make_cache(kv_heads=2)
    first = rand_qkv(5, seed=6, heads=4, kv_heads=2)
    second = rand_qkv(3, seed=7, heads=4, kv_heads=2)
    out1 = step(cache, [Chunk(key("r"), 0, segs((5, C)), first)])[0]
    assert_layers_close(out1, dense(History(), segs((5, C)), first))
    out2 = step(cache, [Chunk(key("r"), 5, segs((3, C)), second)])[0]
    assert_layers_close(out2, dense(History().extended(segs((5, C)), first),
                                    segs((3, C)), second))


def test_decode_fast_path_equals_per_sequence_path() -> None:
    prompts = {"a": 5, "b": 0, "c": 9}
    caches, hists = [], {}
    for _ in range(2):
        cache = make_cache(kv_heads=2)
        for i, (rid, n) in enumerate(prompts.items()):
            if n:
                qkv = rand_qkv(n, seed=10 + i, heads=4)
                step(cache, [Chunk(key(rid), 0, segs((n, C)), qkv)])
                hists[rid] = History().extended(segs((n, C)), qkv)
            else:
                cache.create(key(rid))
                hists[rid] = History()
        caches.append(cache)
    fast_cache, ref_cache = caches
    for t in range(3):  # a few decode steps, contexts growing
        chunks = [Chunk(key(rid), prompts[rid] + t, segs((1, C)),
                        rand_qkv(1, seed=100 * t + i, heads=4))
                  for i, rid in enumerate(prompts)]
        seqs = [SeqChunk(key=c.key, start=i, length=1, context_len=c.context_len,
                         segments=c.segments, mode="scratch") for i, c in enumerate(chunks)]
        assert TorchAttention(seqs, cache=fast_cache).uses_batched_decode
        fast = step(fast_cache, chunks)
        ref = step(ref_cache, chunks, batched_decode=False)
        for c, f, r in zip(chunks, fast, ref):
            assert_layers_close(f, r)
            assert_layers_close(f, dense(hists[c.key.request_id], c.segments, c.qkv))
            hists[c.key.request_id] = hists[c.key.request_id].extended(c.segments, c.qkv)
    torch.testing.assert_close(fast_cache.pool.kv, ref_cache.pool.kv)


def test_cacheless_ragged_batch_equals_each_item_alone() -> None:
    items = [segs((4, B)), segs((2, C), (3, B)), segs((1, B), (5, B))]
    qkvs = [rand_qkv(sum(s.length for s in layout), seed=20 + i)
            for i, layout in enumerate(items)]
    backend = RaggedAttention(items)
    with attention_context(backend):
        batch = [current_attention().attend(layer, *(torch.cat([x[layer][i] for x in qkvs])
                                                     for i in range(3)), SCALE)
                 for layer in range(LAYERS)]
    start = 0
    for layout, qkv in zip(items, qkvs):
        n = sum(s.length for s in layout)
        alone = RaggedAttention([layout])
        for layer in range(LAYERS):
            solo = alone.attend(layer, *qkv[layer], SCALE)
            torch.testing.assert_close(batch[layer][start:start + n], solo)
        assert_layers_close([b[start:start + n] for b in batch], dense(History(), layout, qkv))
        start += n


def test_forked_sequence_attends_over_shared_prefix_like_its_source() -> None:
    cache = make_cache()
    prefix = rand_qkv(6, seed=30)  # ends on a partly filled page
    step(cache, [Chunk(key("r"), 0, segs((6, C)), prefix)])
    hist = History().extended(segs((6, C)), prefix)
    src, twin, other = key("r"), key("r", child=1), key("r", child=2)
    cache.fork(src, twin)
    cache.fork(src, other)
    same, different = rand_qkv(3, seed=31), rand_qkv(3, seed=32)
    outs = step(cache, [Chunk(src, 6, segs((3, C)), same), Chunk(twin, 6, segs((3, C)), same),
                        Chunk(other, 6, segs((3, C)), different)])
    assert_layers_close(outs[1], outs[0])
    assert_layers_close(outs[0], dense(hist, segs((3, C)), same))
    assert_layers_close(outs[2], dense(hist, segs((3, C)), different))
    # Each side wrote its own copy of the shared page; the prefix page is still shared.
    tables = [cache.page_table(k) for k in (src, twin, other)]
    assert tables[0][0] == tables[1][0] == tables[2][0] and len({t[1] for t in tables}) == 3
    for k, new in ((src, same), (other, different)):
        got_k, _ = cache.gather(0, k, 9)
        torch.testing.assert_close(got_k, torch.cat([prefix[0][1], new[0][1]]))
