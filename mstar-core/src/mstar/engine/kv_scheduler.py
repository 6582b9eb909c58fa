"""The KV engine's scheduler: decides each step and hands it over as a `StepPlan`.

It owns the queue of tasks (one per queued invocation, or a rebuild of a preempted
sequence) and decides, under the token budget, which chunk of which sequence runs (running
sequences first, then new ones; a prefill is cut into chunks, never inside a bidirectional
segment), reserves their pages (preempting the most recently admitted other request when
they run out: "preemption by recompute"), and starts prompt chunks from cached prefixes. It
runs nothing: the runner (`kv_runner`) turns the plan into a forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mstar.config.deployment import SchedulerConfig
from mstar.engine.kv_cache import KVCacheManager, OutOfPages
from mstar.engine.prefix_cache import page_hashes, reusable_length
from mstar.engine.sequence import Chunk, SeqState
from mstar.engine.work import NodeWork, WorkResult
from mstar.errors import RequestError
from mstar.model.contract import KVSpec
from mstar.model.forward import Segment, SeqKey


@dataclass(eq=False)  # tasks are compared by identity (`waiting.remove`)
class Task:
    """One queued invocation of the node (or, with `work` None, a sequence's rebuild)."""

    work: NodeWork | None  # None for a recompute
    key: SeqKey
    chunk: Chunk
    mode: str
    wanted: dict[str, str]
    samples: bool
    done: int = 0
    arrival: int = 0
    pieces: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    first: bool = False  # the chunk starts its sequence (a prompt or a rebuild)
    hashes: list[bytes] | None = None  # the sequence's full pages' hashes, up to its end
    registered: int = 0  # pages of it registered in the prefix cache so far

    @property
    def n(self) -> int:
        """Tokens of the chunk."""
        return self.chunk.length

    @property
    def request_id(self) -> str:
        return self.key.request_id


@dataclass(frozen=True)
class PlanEntry:
    """Tokens [start, start + take) of a task's chunk run in this step (pages reserved;
    `adopted`: the cached pages its sequence took from the prefix cache for it)."""

    task: Task
    start: int
    take: int
    adopted: tuple[int, ...] = ()

    @property
    def key(self) -> SeqKey:
        return self.task.key

    @property
    def end(self) -> int:
        return self.start + self.take

    @property
    def is_last(self) -> bool:
        """The entry ends its task's chunk: the invocation finishes with this step."""
        return self.end == self.task.n

    @property
    def samples(self) -> bool:
        return self.task.samples and self.is_last

    @property
    def piece(self) -> Chunk:
        """The chunk's tokens of this step (ids, positions, segments, extras)."""
        chunk = self.task.chunk
        return chunk if (self.start, self.end) == (0, chunk.length) else chunk.slice(
            self.start, self.end)


@dataclass(frozen=True)
class StepPlan:
    """What one step runs, in batch order, and what scheduling it decided on the way:
    the invocations it failed (their results) and the requests it preempted."""

    entries: tuple[PlanEntry, ...] = ()
    failed: tuple[WorkResult, ...] = ()
    preempted: tuple[str, ...] = ()


def segment_range(segments: list[Segment], k: int) -> tuple[int, int]:
    """Token range of segment `k` (negative from the end); (0, 0) when there is none."""
    k = k if k >= 0 else len(segments) + k
    if not 0 <= k < len(segments):
        return (0, 0)
    start = sum(s.length for s in segments[:k])
    return (start, start + segments[k].length)


def record(state: SeqState, piece: Chunk, ids: list[int] | None = None,
           top: int | None = None) -> None:
    """`piece` is now in the sequence's cache: remember it (recompute, forks, sampling
    penalties, next position). `ids` and `top` (its largest first-axis position) may come
    from the whole batch's host copy, saving a device read per sequence."""
    state.history.append(piece)
    state.appended_ids.extend(piece.input_ids.tolist() if ids is None else ids)
    top = int(piece.positions[0].max()) if top is None else top
    state.next_position = max(state.next_position, top + 1)


class KVScheduler:
    """Plans the steps of one KV node over its sequences (`seqs`, shared with the engine)."""

    def __init__(self, node: str, spec: KVSpec, cache: KVCacheManager,
                 seqs: dict[SeqKey, SeqState], config: SchedulerConfig,
                 counters: dict[str, int], *, prefix_caching: bool,
                 batch_extras: Callable[[list[Chunk]], dict[str, torch.Tensor]],
                 default_extra: Callable[[str, int | None], torch.Tensor],
                 mirror_op: Callable[..., None]):
        self.node = node
        self.cache = cache
        self.seqs = seqs
        self.config = config
        self.counters = counters
        self.prefix_caching = prefix_caching
        #: The ranks sharding this node (leader first), () when it is not tensor parallel.
        self.tp_ranks: tuple[int, ...] = ()
        self.waiting: list[Task] = []
        self._extras = {e.name: e for e in spec.extras}
        self._batch_extras = batch_extras  # the extras a forward would see (for hashing)
        self._default_extra = default_extra
        self._mirror_op = mirror_op  # a preemption's page reset, to TP followers
        self._arrivals = itertools.count()
        self._admissions = itertools.count()

    # -- the queue --------------------------------------------------------------------------
    def add(self, task: Task) -> None:
        task.arrival = next(self._arrivals)
        self.waiting.append(task)

    def next_admission(self) -> int:
        """The admission number of a sequence that arrives with its pages (a migration)."""
        return next(self._admissions)

    def fail(self, task: Task, error: Exception) -> list[WorkResult]:
        """`task` failed: drop it (a rebuild fails its whole request)."""
        if task.work is None:
            return self.fail_request(task.request_id, error)
        self.waiting.remove(task)
        return [WorkResult(task.work, error=error)]

    def fail_request(self, request_id: str, error: Exception) -> list[WorkResult]:
        mine = [t for t in self.waiting if t.request_id == request_id]
        self.waiting = [t for t in self.waiting if t.request_id != request_id]
        return [WorkResult(t.work, error=error) for t in mine if t.work is not None]

    def retire(self, finished: list[Task]) -> None:
        """The runner ran the whole chunk of each of `finished`."""
        if finished:
            gone = set(finished)
            self.waiting = [t for t in self.waiting if t not in gone]

    # -- planning ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        batch: list[PlanEntry] = []
        failed: list[WorkResult] = []
        preempted: list[str] = []
        in_batch: set[str] = set()
        gone: set[str] = set()  # requests failed in this loop (their tasks are dropped)
        for state in list(self.seqs.values()):
            if state.needs_recompute and any(t.key == state.key for t in self.waiting):
                self._start_recompute(state)
        order = sorted(self.waiting, key=lambda t: (self.seqs[t.key].admitted < 0, t.arrival))
        # Completions of one request are rebuilt one after another: a rebuild started once
        # its sibling's is done adopts their whole common prefix from the prefix cache (as
        # their fork shared it), where rebuilds run side by side share only what the first
        # chunk found hashed, and the request could outgrow the cache it was admitted to.
        rebuilding = {(t.request_id, t.key.label) for t in self.waiting
                      if t.work is None and t.done > 0}
        admitting_new = True
        for task in order:
            if len(batch) >= self.config.max_num_seqs or budget <= 0:
                break
            if task.request_id in gone:
                continue
            state = self.seqs[task.key]
            if (state.recomputing and task.work is not None) or state.needs_recompute:
                continue
            if task.work is None and task.done == 0:
                if (task.request_id, task.key.label) in rebuilding:
                    continue
                rebuilding.add((task.request_id, task.key.label))
            is_new = state.admitted < 0
            if is_new and not admitting_new:
                continue
            base = self.cache.length(task.key)
            reused, detached, adopted = 0, None, ()
            if task.done == 0 and task.mode == "append":
                task.first = base == 0
                # A later chunk of several tokens: the next item of a prompt prefilled item
                # by item (BAGEL: an image, then its text), or a frame appended.
                if task.first or (task.work is not None and task.n > 1):
                    reused, detached, adopted = self._reuse_prefix(task, base)
            take = self._chunk_len(task, budget, not batch)
            if take == 0:
                self._undo_reuse(task, reused, base, detached)
                continue
            if task.mode == "append":
                reserved = False  # its new or copy-on-write pages
                while not reserved:
                    try:
                        self.cache.reserve(task.key, take)
                        reserved = True
                    except OutOfPages:
                        victim = self._preempt_one(in_batch | {task.request_id})
                        if victim is None:
                            break
                        preempted.append(victim)
                if not reserved:
                    self._undo_reuse(task, reused, base, detached)
                    others = any(s.admitted >= 0 and s.key.request_id != task.request_id
                                 for s in self.seqs.values())
                    if not batch and not others:
                        gone.add(task.request_id)
                        pool = self.cache.pool
                        failed.extend(self.fail_request(task.request_id, RequestError(
                            f"the KV cache of {self.node} cannot hold this request: its "
                            f"{pool.num_pages} pages of {pool.page_size} tokens hold "
                            f"{pool.num_pages * pool.page_size} tokens", code=507)))
                    admitting_new = admitting_new and not is_new
                    continue
            if state.admitted < 0:
                state.admitted = next(self._admissions)
            if detached is not None:
                self.cache.pool.decref(detached)
            if reused and task.work is not None:
                record(state, task.chunk.slice(0, reused))
            self.counters["prefix_cache_hit_tokens"] += reused
            if task.first:  # what prefilling a new sequence computed
                self.counters["prompt_tokens_computed"] += take
            batch.append(PlanEntry(task, task.done, take, adopted))
            in_batch.add(task.request_id)
            budget -= take
        return StepPlan(tuple(batch), tuple(failed), tuple(preempted))

    def _chunk_len(self, task: Task, budget: int, batch_empty: bool) -> int:
        remaining = task.n - task.done
        if task.mode == "scratch":
            return remaining if remaining <= budget or batch_empty else 0
        take, pos = 0, 0
        for seg in task.chunk.segments:
            seg_end = pos + seg.length
            if seg_end > task.done:
                avail = seg_end - max(task.done, pos)
                if seg.kind == "bidirectional":
                    if take + avail <= budget or (take == 0 and batch_empty):
                        take += avail
                    else:
                        break
                else:
                    t = min(avail, budget - take)
                    if t <= 0:
                        break
                    take += t
                    if t < avail:
                        break
            pos = seg_end
        return take

    def _preempt_one(self, protect: set[str]) -> str | None:
        """Drop the pages of the most recently admitted request not in `protect`; its id."""
        holders = [s for s in self.seqs.values() if s.admitted >= 0 and not s.needs_recompute
                   and s.key.request_id not in protect and self.cache.has(s.key)
                   and self.cache.capacity(s.key) > 0]
        if not holders:
            return None
        victim = max(holders, key=lambda s: s.admitted).key.request_id
        self.counters["preemptions"] += 1
        for state in self.seqs.values():
            if state.key.request_id == victim and self.cache.has(state.key):
                self.cache.free(state.key)
                self.cache.create(state.key)
                self._mirror_op("reset", victim, state.key.label, state.key.child)
                state.needs_recompute = bool(state.history)
                state.recomputing = False
                state.admitted = -1
        # A half-done recompute is dropped: `schedule` starts a fresh one from the history.
        self.waiting = [t for t in self.waiting if t.request_id != victim or t.work is not None]
        return victim

    def _start_recompute(self, state: SeqState) -> None:
        state.needs_recompute = False
        state.recomputing = True
        task = Task(work=None, key=state.key,
                    chunk=Chunk.concat(state.history, fill=self._default_extra),
                    mode="append", wanted={}, samples=False, arrival=-1)
        self.waiting.insert(0, task)

    # -- prefix caching ---------------------------------------------------------------------
    def _reuse_prefix(self, task: Task, base: int) -> tuple[int, int | None, tuple[int, ...]]:
        """Start the prompt chunk of `task` from cached pages: those of the longest cached
        prefix of the sequence's `base` tokens followed by the chunk. Returns the chunk's
        tokens reused (0 when off), the partly filled page the sequence let go for them
        (`KVCacheManager.adopt`) and the pages adopted. Stops before the first token whose
        outputs are wanted (at least the last token runs) and never inside a bidirectional
        segment."""
        if not self.prefix_caching:
            return 0, None, ()
        ps = self.cache.pool.page_size
        chunk = task.chunk
        if task.hashes is None:
            task.hashes = self._page_hashes(task, base)
            task.registered = base // ps
        pages = self.cache.match_prefix(task.hashes)
        if len(pages) * ps <= base:
            return 0, None, ()
        limit = task.n - 1
        for at in task.wanted.values():
            if at == "all":
                limit = 0
            elif at.startswith("segment:"):
                limit = min(limit, segment_range(chunk.segments, int(at.split(":", 1)[1]))[0])
        # In the sequence's coordinates: pages are whole there, not in the chunk.
        segments = [Segment(base), *chunk.segments] if base else chunk.segments
        end = reusable_length(len(pages) * ps, segments, base + limit, ps)
        if end <= base:
            return 0, None, ()
        adopted = tuple(pages[base // ps:end // ps])
        detached = self.cache.adopt(task.key, list(adopted))
        task.done = end - base
        return task.done, detached, adopted

    def _page_hashes(self, task: Task, base: int) -> list[bytes]:
        """Prefix-cache hashes of the sequence with `task`'s chunk appended, hashed as one
        chunk (what a rebuild appends: equal contents hash equal however they were cut);
        none when the history cannot stand for the sequence (another length, or chunks whose
        sequence-level extras differ: they are not one chunk)."""
        chunk = task.chunk
        if base:
            history = self.seqs[task.key].history
            mine = self._seq_extras(chunk)
            if sum(c.length for c in history) != base or any(
                    not all(torch.equal(v, mine[k]) for k, v in self._seq_extras(c).items())
                    for c in history):
                return []
            chunk = Chunk.concat([*history, chunk], fill=self._default_extra)
        extras = self._batch_extras([chunk])  # exactly what the forward would see
        return page_hashes(
            chunk.input_ids, chunk.positions, chunk.segments,
            {k: v for k, v in extras.items() if self._extras[k].per == "token"},
            {k: v for k, v in extras.items() if self._extras[k].per == "seq"},
            page_size=self.cache.pool.page_size,
            salt=f"{self.node}|{task.key.label}|{self.cache.pool.spec.dtype}")

    def _seq_extras(self, chunk: Chunk) -> dict[str, torch.Tensor]:
        return {k: chunk.seq_extras[k] if k in chunk.seq_extras else self._default_extra(k, None)
                for k, e in self._extras.items() if e.per == "seq"}

    def _undo_reuse(self, task: Task, reused: int, base: int, detached: int | None) -> None:
        """The task could not be scheduled after all: give its adopted pages back."""
        if reused:
            self.cache.unadopt(task.key, base, detached)
            task.done = 0
