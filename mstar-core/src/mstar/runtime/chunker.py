"""Cutting a growing stream of units into overlapping windows (one streaming edge, one
request).

The windowing is `ChunkPolicy`'s: emission boundaries e0 = 0, e1 = `first_chunk` (default
`hop`), e(k+1) = e(k) + hop. Window k emits units [e(k), e(k+1)) and spans input units
[e(k) - left, e(k+1) + lookahead), clipped to [0, units pushed). It is ready once
e(k+1) + lookahead units exist, or once the stream has ended; after the end the remaining
boundaries are clipped to the stream's length (the flush), so every unit is emitted by
exactly one window, in order. The consumer runs its node on a whole window and keeps only
the rows of the emitted units (`slice_emitted`).

End of stream: `Window.final` is True when the window is known to be the last when it is
cut. A stream may end after its last window was cut (possible only when lookahead is 0), and
an empty stream that ends yields no window at all; in both cases the consumer learns of the
end through `ended` (the edge's end flag), not through a final window.

The chunker keeps only the units a future window needs: `release()` drops the rest and
returns how many producer rows the edge may hand back to the producer as credits
(backpressure bounds what the consumer holds, never by dropping data).

Assembly: with `ChunkPolicy.assemble`, the producer's rows pass through a per-request
`UnitAssembler` before windowing (Orpheus: valid audio codes, seven to a codec frame). The
end of the stream is then counted in the producer's rows (`end(total)` takes the rows the
producer pushed). Credits: every row received is credited back except one charged to each
unit still held, so rows the assembler dropped (or keeps toward a partial unit, which the
assembler bounds itself) are credited at once. Without an assembler a row is a unit and a
unit's row is credited when the unit is dropped. Either way the producer's rows in flight
(pushed, not credited) are the units the consumer holds plus the rows still on their way,
so a producer paused at `max_buffered` always resumes once the consumer has what a window
needs (`ChunkPolicy` refuses a `max_buffered` smaller than that).

Per-request first window (`ChunkPolicy.first_chunk_param`): the request's param replaces
`first_chunk` (`first_chunk_of`); it is set on the chunker (`set_first_chunk`) when the
consumer's walk starts, before any window is cut (units may arrive earlier). The producer's
bound is then `producer_bound`: raised to the first window's units until it has pushed them.

After the end (`ChunkPolicy.continue_after_end`): `empty_units` are what each further
invocation of the consumer gets, 0 rows of every name with the stream's trailing shape and
dtype (None when nothing was ever pushed: there is no shape to give).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from mstar.errors import RequestError
from mstar.graph.primitives import ChunkPolicy


class UnitAssembler(Protocol):
    """Turns a request's producer rows into units, keeping whatever state it needs (a
    partial frame, a count of valid codes)."""

    def push(self, rows: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The units the new rows complete (each name with the same number of rows; none
        or empty tensors when they complete none)."""


@dataclass(frozen=True, eq=False)
class Window:
    """Input units of one window and the range of them whose output is emitted."""

    index: int
    units: dict[str, torch.Tensor]
    win_start: int
    win_end: int
    emit_start: int
    emit_end: int
    final: bool


class StreamChunker:
    """Buffers one request's stream of named unit rows and cuts windows by `policy`."""

    def __init__(self, policy: ChunkPolicy):
        self.policy = policy
        self._names: tuple[str, ...] | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._base = 0  # stream index of the buffer's first row
        self._pushed = 0  # units pushed so far
        self._index = 0  # index of the next window
        self._next_emit = 0  # e(index)
        self._end_requested = False
        self._total: int | None = None
        self._assembler: UnitAssembler | None = policy.assemble() if policy.assemble else None
        self._rows = 0  # producer rows pushed (the units themselves without an assembler)
        self._credited = 0  # producer rows handed back by `release`
        self._first_chunk = policy.first_chunk  # e1, unless the request sets it

    def set_first_chunk(self, units: int | None) -> None:
        """This request's first window (`first_chunk_of`); set again by each walk of the
        consumer, it may change only before the first window is cut."""
        if units is None or units == self._first_chunk:
            return
        if self._index:
            raise ValueError("the first window was already cut")
        self._first_chunk = units

    def _step(self) -> int:
        """Units the next window emits (before the end's clipping)."""
        if self._index == 0 and self._first_chunk is not None:
            return self._first_chunk
        return self.policy.hop

    @property
    def buffered(self) -> int:
        """Units held now."""
        return self._pushed - self._base

    @property
    def room(self) -> int:
        """Units the producer may still push before the buffer is full (backpressure)."""
        return max(0, self.policy.max_buffered - self.buffered)

    @property
    def ended(self) -> bool:
        """The stream has ended and every producer row has been pushed."""
        return self._end_requested and (self._total is None or self._rows == self._total)

    def push(self, units: Mapping[str, torch.Tensor]) -> None:
        """Append the producer's rows (every name with the same number of rows: one per
        unit, or whatever the policy's assembler turns into units)."""
        rows = _row_count(units)
        if self._end_requested and (self._total is None or self._rows + rows > self._total):
            raise ValueError(
                f"push of {rows} rows past the end of the stream "
                f"(pushed {self._rows}, total {self._total})"
            )
        self._rows += rows
        if self._assembler is not None:
            units = {k: v for k, v in self._assembler.push(units).items() if v.shape[0]}
        if units:
            self._append(units)

    def _append(self, units: Mapping[str, torch.Tensor]) -> None:
        names = tuple(sorted(units))
        if self._names is None:
            if not names:
                raise ValueError("a push needs at least one named tensor")
            self._names = names
        elif names != self._names:
            raise ValueError(f"pushed names {names} differ from the stream's {self._names}")
        count = _row_count(units)
        for name in names:
            held = self._buffer.get(name)
            self._buffer[name] = units[name] if held is None else torch.cat([held, units[name]])
        self._pushed += count

    def end(self, total_units: int | None = None) -> None:
        """End the stream; with `total_units`, once the producer has pushed that many rows
        (the last pushes may still be in flight)."""
        if total_units is not None and total_units < self._rows:
            raise ValueError(f"total_units={total_units} but {self._rows} already pushed")
        if self._end_requested and total_units != self._total:
            raise ValueError(f"stream already ended with total_units={self._total}")
        self._end_requested = True
        self._total = total_units

    def next_window(self) -> Window | None:
        """The next ready window, or None (not ready yet, or every unit emitted)."""
        start = self._next_emit
        stop = start + self._step()
        ended = self.ended
        if ended:
            if start >= self._pushed:
                return None
            stop = min(stop, self._pushed)
        elif self._pushed < stop + self.policy.lookahead:
            return None
        win_start = max(0, start - self.policy.left)
        win_end = min(stop + self.policy.lookahead, self._pushed)
        assert self._names is not None  # a ready window holds at least one unit
        rows = slice(win_start - self._base, win_end - self._base)
        window = Window(
            index=self._index,
            units={name: self._buffer[name][rows] for name in self._names},
            win_start=win_start,
            win_end=win_end,
            emit_start=start,
            emit_end=stop,
            final=ended and stop >= self._pushed,
        )
        self._index += 1
        self._next_emit = stop
        return window

    @property
    def pushed(self) -> int:
        """Units pushed so far."""
        return self._pushed

    @property
    def needed(self) -> int:
        """Units that must exist before the next window is ready (before the stream ends)."""
        return self._next_emit + self._step() + self.policy.lookahead

    def empty_units(self) -> dict[str, torch.Tensor] | None:
        """0 rows of every unit name, with the stream's trailing shape and dtype (what a
        consumer that goes on after the end gets); None when nothing was ever pushed."""
        if self._names is None:
            return None
        return {name: self._buffer[name][:0] for name in self._names}

    def release(self) -> int:
        """Drop units no future window needs (all of them once the stream has ended and
        every unit was emitted); returns how many more producer rows may be credited back:
        every row received but one per unit still held."""
        keep_from = min(max(0, self._next_emit - self.policy.left), self._pushed)
        if self.ended and self._next_emit >= self._pushed:
            keep_from = self._pushed
        dropped = keep_from - self._base
        if dropped > 0:
            for name, held in self._buffer.items():
                self._buffer[name] = held[dropped:]
            self._base = keep_from
        credit = max(self._credited, self._rows - self.buffered)
        freed, self._credited = credit - self._credited, credit
        return freed


def first_chunk_of(policy: ChunkPolicy, params: Mapping[str, object]) -> int | None:
    """The first window's units for a request: its `first_chunk_param` value, else the
    policy's `first_chunk`. The model's `process_prompt` sets the param, so a missing or
    bad one is the server's fault: a `RequestError` with code 500 naming it."""
    name = policy.first_chunk_param
    if name is None:
        return policy.first_chunk
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RequestError(f"request param {name!r} (the streaming edge's first window) must "
                           f"be a positive int, got {value!r}", code=500, param=name)
    return value


def producer_bound(policy: ChunkPolicy, first_chunk: int | None, pushed: int) -> int:
    """Rows a producer may have in flight (pushed, not credited back) before it pauses:
    `max_buffered`, raised to the first window's units until the producer has pushed them
    (a first window larger than `max_buffered` could never form otherwise)."""
    first = (first_chunk or policy.hop) + policy.lookahead
    return policy.max_buffered if pushed >= first else max(policy.max_buffered, first)


def _row_count(units: Mapping[str, torch.Tensor]) -> int:
    counts = {name: int(t.shape[0]) for name, t in units.items()}
    if not counts:
        raise ValueError("a push needs at least one named tensor")
    count = next(iter(counts.values()))
    if any(c != count for c in counts.values()):
        raise ValueError(f"pushed tensors have different row counts: {counts}")
    return count


def slice_emitted(output: torch.Tensor, window: Window, dim: int = 0, *,
                  rows_per_unit: int | None = None) -> torch.Tensor:
    """The part of a node output computed for the whole window that belongs to its emitted
    units: `output` has r rows per window unit along `dim` (an integer r, e.g. audio samples
    per codec frame), and the rows of units [emit_start, emit_end) are returned.

    A node whose output falls short of the window's units at their end (Code2Wav: its
    causal transposed convolutions drop trailing samples) names its r as `rows_per_unit`;
    the missing rows are the window's last ones, so the emitted range is cut where the
    output ends, as the node's reference decoder cuts its chunks (HF's `chunked_decode`
    keeps everything after the left context)."""
    span = window.win_end - window.win_start
    rows = output.shape[dim]
    if rows_per_unit is None:
        if rows % span:
            raise ValueError(f"output has {rows} rows along dim {dim}, not a multiple of the "
                             f"window's {span} units")
        r = rows // span
    elif rows > span * rows_per_unit:
        raise ValueError(f"output has {rows} rows along dim {dim}, more than the window's "
                         f"{span} units of {rows_per_unit}")
    else:
        r = rows_per_unit
    first = min((window.emit_start - window.win_start) * r, rows)
    last = min((window.emit_end - window.win_start) * r, rows)
    return output.narrow(dim, first, last - first)
