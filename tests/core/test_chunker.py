"""Streaming-edge windowing: readiness, exactly-once emission, flush, release, slicing."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mstar.errors import RequestError
from mstar.graph.primitives import ChunkPolicy
from mstar.runtime.chunker import (
    StreamChunker,
    Window,
    first_chunk_of,
    producer_bound,
    slice_emitted,
)

ORPHEUS = ChunkPolicy(window=4, hop=1, emit=(1, 2))  # left 1, lookahead 2


def stream(n: int) -> dict[str, torch.Tensor]:
    """A stream of n units with two named payloads (equal row counts)."""
    return {
        "frames": torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3),
        "codes": torch.arange(n * 7).reshape(n, 7),
    }


def rows(data: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in data.items()}


def drain(chunker: StreamChunker) -> list[Window]:
    out = []
    while (w := chunker.next_window()) is not None:
        out.append(w)
    return out


def check_units(window: Window, data: dict[str, torch.Tensor]) -> None:
    assert window.units.keys() == data.keys()
    for name, value in window.units.items():
        assert torch.equal(value, data[name][window.win_start : window.win_end])


@pytest.mark.parametrize("n", range(13))
def test_orpheus_windows_wait_for_lookahead_then_flush(n):
    data = stream(n)
    chunker = StreamChunker(ORPHEUS)
    windows: list[Window] = []
    for u in range(n):
        chunker.push(rows(data, u, u + 1))
        new = drain(chunker)
        # Window k emits unit k and needs units up to k + 2: ready once u + 1 >= k + 3.
        assert [w.emit_start for w in new] == ([u - 2] if u >= 2 else [])
        for w in new:
            assert (w.win_start, w.win_end) == (max(0, w.emit_start - 1), w.emit_start + 3)
            assert not w.final
        windows += new
        chunker.release()
        assert chunker.buffered <= 3
    assert not chunker.ended
    chunker.end()
    assert chunker.ended
    flush = drain(chunker)
    assert len(flush) == min(n, 2)
    if flush:
        assert [w.final for w in flush] == [False] * (len(flush) - 1) + [True]
        assert flush[-1].win_end == n
    windows += flush
    emitted = [u for w in windows for u in range(w.emit_start, w.emit_end)]
    assert emitted == list(range(n))
    assert [w.index for w in windows] == list(range(len(windows)))
    for w in windows:
        check_units(w, data)
        assert w.win_end - w.win_start <= ORPHEUS.window
    assert chunker.next_window() is None


def test_empty_stream_ends_without_a_window():
    chunker = StreamChunker(ORPHEUS)
    chunker.end()
    assert chunker.ended and chunker.next_window() is None and chunker.buffered == 0


def test_first_chunk_larger_than_hop():
    policy = ChunkPolicy(window=6, hop=2, emit=(2, 4), first_chunk=5)  # left 2, lookahead 2
    data = stream(12)
    chunker = StreamChunker(policy)
    chunker.push(rows(data, 0, 6))
    assert chunker.next_window() is None  # needs 5 + 2 units
    chunker.push(rows(data, 6, 7))
    first = chunker.next_window()
    assert (first.win_start, first.emit_start, first.emit_end, first.win_end) == (0, 0, 5, 7)
    assert chunker.next_window() is None  # [5, 7) needs 9 units
    chunker.push(rows(data, 7, 12))
    second, third = drain(chunker)
    assert (second.win_start, second.emit_start, second.emit_end, second.win_end) == (3, 5, 7, 9)
    assert (third.win_start, third.emit_start, third.emit_end, third.win_end) == (5, 7, 9, 11)
    chunker.end()
    fourth, last = drain(chunker)  # the flush keeps the hop boundaries, clipped at the end
    assert (fourth.win_start, fourth.emit_start, fourth.emit_end, fourth.win_end) == (7, 9, 11, 12)
    assert (last.win_start, last.emit_start, last.emit_end, last.win_end) == (9, 11, 12, 12)
    assert last.final and not fourth.final
    for w in (first, second, third, fourth, last):
        check_units(w, data)


def random_policy(rng: random.Random) -> ChunkPolicy:
    window = rng.randint(1, 8)
    start = rng.randint(0, window - 1)
    end = rng.randint(start + 1, window)
    first_chunk = rng.choice([None, rng.randint(1, 10)])
    return ChunkPolicy(window, end - start, (start, end), first_chunk, max_buffered=window + 16)


def test_random_policies_emit_every_unit_exactly_once_in_order():
    rng = random.Random(1234)
    for _ in range(300):
        policy = random_policy(rng)
        n = rng.randint(0, 40)
        data = stream(n)
        chunker = StreamChunker(policy)
        announce_at = rng.randint(0, n)  # end(total_units) may come before the last pushes
        windows: list[Window] = []
        pushed = released = 0
        while True:
            if pushed >= announce_at and not chunker.ended:
                chunker.end(total_units=n)
            if pushed == n:
                assert chunker.ended
            new = drain(chunker)
            for w in new:
                k = w.index
                step = policy.first_chunk if (k == 0 and policy.first_chunk) else policy.hop
                e = windows[-1].emit_end if windows else 0
                assert w.emit_start == e and k == len(windows)
                assert w.win_start <= w.emit_start < w.emit_end <= w.win_end <= pushed
                assert w.win_start == max(0, w.emit_start - policy.left)
                assert w.emit_end == min(e + step, pushed)
                assert w.win_end == min(w.emit_end + policy.lookahead, pushed)
                limit = (
                    (policy.first_chunk + policy.lookahead)
                    if k == 0 and policy.first_chunk
                    else policy.window
                )
                assert w.win_end - w.win_start <= limit
                if not chunker.ended:  # cut before the end: full step and full lookahead
                    assert w.emit_end == e + step
                    assert w.win_end == e + step + policy.lookahead
                assert w.final == (chunker.ended and w.emit_end == n)
                check_units(w, data)
                windows.append(w)
            # Eager: nothing more is ready unless its lookahead exists (or the stream ended).
            e = windows[-1].emit_end if windows else 0
            step = policy.first_chunk if (not windows and policy.first_chunk) else policy.hop
            if chunker.ended:
                assert e == n
            else:
                assert pushed < e + step + policy.lookahead
            if rng.random() < 0.7:
                released += chunker.release()
                keep = pushed if chunker.ended and e == pushed else max(0, e - policy.left)
                assert chunker.buffered == pushed - min(keep, pushed)
            assert released + chunker.buffered == pushed
            if pushed == n:
                break
            size = rng.randint(0, min(5, n - pushed))
            chunker.push(rows(data, pushed, pushed + size))
            pushed += size
        emitted = [u for w in windows for u in range(w.emit_start, w.emit_end)]
        assert emitted == list(range(n)), policy
        assert sum(w.final for w in windows) == (1 if n and windows[-1].final else 0)


def codec(units: torch.Tensor, weight: torch.Tensor, left: int, lookahead: int) -> torch.Tensor:
    """A convolutional "decoder" whose receptive field is exactly [u - left, u + lookahead]:
    3 output samples per unit, as rows (units * 3,)."""
    x = F.pad(units.T.unsqueeze(0), (left, lookahead))  # (1, C, T + context)
    return F.conv1d(x, weight)[0].T.reshape(-1)  # (T, 3) -> (T * 3,)


@pytest.mark.parametrize(
    "policy",
    [ORPHEUS, ChunkPolicy(6, 2, (2, 4), first_chunk=3), ChunkPolicy(3, 3, (0, 3))],
)
def test_slice_emitted_reconstructs_one_shot_output(policy):
    torch.manual_seed(0)
    n, channels = 23, 4
    units = torch.randn(n, channels)
    weight = torch.randn(3, channels, policy.left + policy.lookahead + 1)
    one_shot = codec(units, weight, policy.left, policy.lookahead)
    chunker = StreamChunker(policy)
    pieces = []
    for start in range(0, n, 2):
        chunker.push({"frames": units[start : start + 2]})
        for w in drain(chunker):
            out = codec(w.units["frames"], weight, policy.left, policy.lookahead)
            pieces.append(slice_emitted(out, w))
        chunker.release()
    chunker.end()
    for w in drain(chunker):
        out = codec(w.units["frames"], weight, policy.left, policy.lookahead)
        pieces.append(slice_emitted(out, w))
    torch.testing.assert_close(torch.cat(pieces), one_shot, rtol=1e-5, atol=1e-5)
    # A unit-wise codec (no context) reconstructs exactly.
    unitwise = torch.cat([units[:, :1] * 1, units[:, :1] * 2, units[:, :1] * 3], 1).reshape(-1)
    chunker = StreamChunker(policy)
    chunker.push({"frames": units})
    chunker.end()
    parts = []
    for w in drain(chunker):
        f = w.units["frames"][:, :1]
        parts.append(slice_emitted(torch.cat([f, 2 * f, 3 * f], 1).reshape(-1), w))
    assert torch.equal(torch.cat(parts), unitwise)


def test_slice_emitted_dim_and_errors():
    w = Window(0, {}, win_start=2, win_end=6, emit_start=3, emit_end=5, final=False)
    out = torch.arange(2 * 8).reshape(2, 8)  # 2 samples per unit along dim 1
    assert torch.equal(slice_emitted(out, w, dim=1), out[:, 2:6])
    assert torch.equal(slice_emitted(torch.arange(4), w), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="not a multiple"):
        slice_emitted(torch.zeros(7), w)


def test_slice_emitted_short_output_loses_the_windows_tail():
    """A decoder whose window output lacks its last rows (5 per unit, 4 short: as many as
    the window has units, so r cannot be read off the output): the units before the
    emitted range still take 5 rows each, the shortfall comes off the end."""
    w = Window(0, {}, win_start=2, win_end=6, emit_start=3, emit_end=6, final=False)
    out = torch.arange(4 * 5 - 4)
    assert torch.equal(slice_emitted(out, w, rows_per_unit=5), out[5:])
    with pytest.raises(ValueError, match="not a multiple"):
        slice_emitted(torch.arange(4 * 5 - 3), w)
    early = Window(0, {}, win_start=2, win_end=6, emit_start=2, emit_end=4, final=False)
    assert torch.equal(slice_emitted(out, early, rows_per_unit=5), out[:10])
    # Whole units of output: the rule is the plain one.
    full = torch.arange(20)
    assert torch.equal(slice_emitted(full, w, rows_per_unit=5), slice_emitted(full, w))
    with pytest.raises(ValueError, match="more than"):
        slice_emitted(torch.arange(21), w, rows_per_unit=5)


def test_release_frees_units_and_room_tracks_the_bound():
    policy = ChunkPolicy(window=4, hop=1, emit=(1, 2), max_buffered=6)
    data = stream(10)
    chunker = StreamChunker(policy)
    chunker.push(rows(data, 0, 6))
    assert chunker.buffered == 6 and chunker.room == 0
    assert chunker.release() == 0  # window 0 still needs unit 0
    windows = drain(chunker)  # emits units 0..3 (unit 3 needs units up to 5)
    assert [w.emit_start for w in windows] == [0, 1, 2, 3]
    assert chunker.release() == 3  # the next window starts at unit 4 - 1
    assert chunker.buffered == 3 and chunker.room == 3
    assert chunker.release() == 0
    chunker.push(rows(data, 6, 10))
    chunker.end()
    rest = drain(chunker)
    for w in rest:
        check_units(w, data)  # rows are read relative to the released base
    assert [w.emit_start for w in rest] == list(range(4, 10))
    assert chunker.release() == 7 and chunker.buffered == 0  # all emitted: nothing is held


def test_end_with_total_units_waits_for_remaining_pushes():
    data = stream(5)
    chunker = StreamChunker(ORPHEUS)
    chunker.push(rows(data, 0, 3))
    chunker.end(total_units=5)
    assert not chunker.ended
    assert [w.emit_start for w in drain(chunker)] == [0]  # no flush yet
    chunker.push(rows(data, 3, 4))
    assert not chunker.ended
    assert [w.emit_start for w in drain(chunker)] == [1]
    chunker.push(rows(data, 4, 5))
    assert chunker.ended
    tail = drain(chunker)
    assert [w.emit_start for w in tail] == [2, 3, 4] and tail[-1].final
    with pytest.raises(ValueError, match="past the end"):
        chunker.push(rows(data, 0, 1))


def test_push_and_end_errors():
    chunker = StreamChunker(ORPHEUS)
    chunker.push(stream(2))
    with pytest.raises(ValueError, match="differ"):
        chunker.push({"frames": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="row counts"):
        chunker.push({"frames": torch.zeros(1, 3), "codes": torch.zeros(2, 7, dtype=torch.long)})
    with pytest.raises(ValueError, match="already pushed"):
        chunker.end(total_units=1)
    chunker.end()
    with pytest.raises(ValueError, match="past the end"):
        chunker.push(stream(1))
    with pytest.raises(ValueError, match="already ended"):
        chunker.end(total_units=4)


class _Triples:
    """Test assembler: drops negative rows, packs three valid ones into one unit."""

    def __init__(self):
        self.held: list[int] = []

    def push(self, rows):
        self.held += [int(v) for v in rows["tok"].tolist() if v >= 0]
        n = len(self.held) // 3 * 3
        done, self.held = self.held[:n], self.held[n:]
        return {"frame": torch.tensor(done, dtype=torch.long).reshape(-1, 3)}


def test_an_assembler_turns_producer_rows_into_units_and_credits_rows():
    policy = ChunkPolicy(window=2, hop=1, emit=(0, 1), max_buffered=20, assemble=_Triples)
    chunker = StreamChunker(policy)
    tokens = [1, 2, -1, 3, 4, 5, -7, 6, 7, 8, 9]  # frames (1,2,3) (4,5,6) (7,8,9)
    for t in tokens[:8]:
        chunker.push({"tok": torch.tensor([t])})
    (first,) = drain(chunker)  # frame 0 needs frame 1 as lookahead
    assert first.units["frame"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert chunker.release() == 7  # one row stays charged to frame 1, still held
    for t in tokens[8:]:
        chunker.push({"tok": torch.tensor([t])})
    chunker.end(total_units=len(tokens) + 1)  # one more row is still in flight
    assert not chunker.ended
    chunker.push({"tok": torch.tensor([-1])})
    assert chunker.ended
    rest = drain(chunker)
    assert [w.units["frame"][w.emit_start - w.win_start].tolist() for w in rest] == [
        [4, 5, 6], [7, 8, 9]]
    assert chunker.release() == len(tokens) + 1 - 7  # all emitted: every row is free


def test_a_policy_whose_buffer_cannot_hold_a_window_is_refused():
    with pytest.raises(ValueError, match="max_buffered=3 cannot hold a window"):
        ChunkPolicy(window=4, hop=1, emit=(1, 2), max_buffered=3)
    with pytest.raises(ValueError, match="needs up to 7 units"):  # first_chunk 5 + lookahead 2
        ChunkPolicy(window=4, hop=1, emit=(1, 2), first_chunk=5, max_buffered=6)
    assert ChunkPolicy(window=4, hop=1, emit=(1, 2), first_chunk=5, max_buffered=7)


def run_edge(policy: ChunkPolicy, tokens: list[int]) -> tuple[list[Window], int]:
    """A producer of one row per step under the edge's backpressure (it may push while
    fewer than `max_buffered` rows are uncredited; the consumer credits at every push and
    after every window, as the worker does) and a consumer that runs every ready window.
    Returns the windows and the rows still uncredited at the end."""
    chunker = StreamChunker(policy)
    windows: list[Window] = []
    sent = credited = 0
    for token in tokens:
        if sent - credited >= policy.max_buffered:  # paused: only the consumer can move
            windows += drain(chunker)
            credited += chunker.release()
            assert sent - credited < policy.max_buffered, (
                f"producer paused at row {sent} and no window can form")
        chunker.push({"tok": torch.tensor([token])})
        sent += 1
        credited += chunker.release()
        assert sent - credited <= chunker.buffered  # uncredited rows are held units only
    chunker.end(total_units=sent)
    windows += drain(chunker)
    credited += chunker.release()
    return windows, sent - credited


@pytest.mark.parametrize("first_chunk", [None, 2])
def test_rows_that_make_no_unit_are_credited_at_once_so_the_producer_never_stalls(first_chunk):
    policy = ChunkPolicy(window=4, hop=1, emit=(1, 2), first_chunk=first_chunk,
                         max_buffered=5 if first_chunk else 4, assemble=_Triples)
    frames = [[3 * f + 1, 3 * f + 2, 3 * f + 3] for f in range(12)]
    junk = [-1] * (10 * policy.max_buffered)
    codes = [c for i, frame in enumerate(frames) for c in ([-5] * (i % 3) + frame)]
    windows, uncredited = run_edge(policy, junk + codes[:20] + junk + codes[20:] + [-1, 7])
    emitted = [w.units["frame"][u - w.win_start].tolist()
               for w in windows for u in range(w.emit_start, w.emit_end)]
    assert emitted == frames  # every frame once, in order; the partial one (7) is dropped
    assert windows[-1].final and uncredited == 0


def test_an_all_junk_stream_ends_cleanly():
    policy = ChunkPolicy(window=4, hop=1, emit=(1, 2), max_buffered=4, assemble=_Triples)
    windows, uncredited = run_edge(policy, [-1] * 100)
    assert windows == [] and uncredited == 0


#: A Talker fed row by row whose prefill takes the request's prompt rows at once.
TALKER = ChunkPolicy(window=1, hop=1, emit=(0, 1), max_buffered=2,
                     first_chunk_param="first_rows", continue_after_end=True)


def test_a_request_param_sets_the_first_window():
    assert first_chunk_of(TALKER, {"first_rows": 5}) == 5
    assert first_chunk_of(ORPHEUS, {"first_rows": 5}) is None  # no param: the policy's
    data = stream(9)
    chunker = StreamChunker(TALKER)
    chunker.set_first_chunk(5)
    chunker.push(rows(data, 0, 4))
    assert chunker.next_window() is None and chunker.needed == 5
    chunker.push(rows(data, 4, 7))
    first, second, third = drain(chunker)
    assert (first.emit_start, first.emit_end) == (0, 5) and first.win_end == 5
    assert [(w.emit_start, w.emit_end) for w in (second, third)] == [(5, 6), (6, 7)]
    for w in (first, second, third):
        check_units(w, data)
    chunker.set_first_chunk(5)  # another walk of the consumer: the same value is fine
    with pytest.raises(ValueError, match="already cut"):
        chunker.set_first_chunk(6)


@pytest.mark.parametrize("params", [{}, {"first_rows": 0}, {"first_rows": -3},
                                    {"first_rows": "5"}, {"first_rows": True},
                                    {"first_rows": 2.5}])
def test_a_missing_or_bad_first_window_param_is_an_error_naming_it(params):
    with pytest.raises(RequestError, match="'first_rows'") as exc:
        first_chunk_of(TALKER, params)
    assert exc.value.param == "first_rows" and exc.value.code == 500  # the model's param


def test_the_producer_may_push_a_first_window_larger_than_max_buffered():
    # max_buffered 2, first window 6 units: the bound is raised until 6 rows were pushed
    assert [producer_bound(TALKER, 6, pushed) for pushed in (0, 5, 6, 9)] == [6, 6, 2, 2]
    assert producer_bound(TALKER, None, 0) == 2  # hop + lookahead fit max_buffered
    assert producer_bound(ORPHEUS, 2, 0) == ORPHEUS.max_buffered


def test_empty_units_keep_the_streams_trailing_shape_and_dtype():
    chunker = StreamChunker(TALKER)
    assert chunker.empty_units() is None  # nothing pushed: no shape to give
    data = stream(3)
    chunker.push(data)
    chunker.end()
    assert len(drain(chunker)) == 3 and chunker.release() == 3
    empty = chunker.empty_units()
    assert {k: (tuple(v.shape), v.dtype) for k, v in empty.items()} == {
        "frames": ((0, 3), torch.float32), "codes": ((0, 7), torch.long)}
