"""The KV-cache engine: continuous batching of one KV node's invocations over a paged cache.

Each `step` schedules work under a token budget (running sequences first, then new ones;
a prefill is cut into chunks, never inside a bidirectional segment), reserves pages
(preempting the most recently admitted other request when they run out: its pages are
dropped and rebuilt later from its history, "preemption by recompute"), builds one ragged
`ForwardBatch` for all of it, runs the node once, samples `logits` into `token_ids`, and
returns the finished invocations' outputs. Prefills, decode steps and denoising steps of
different requests and walks share one forward.

Prefix caching: the first chunk of a new sequence (a prompt, or the rebuild of a preempted
one) starts from the longest run of its full pages already in the cache (`prefix_cache`
hashes everything that determines a page's K/V) and computes only the rest; its own full
pages are registered once the step that wrote them is done. `counters` counts the tokens of
such first chunks that were run (`prompt_tokens_computed`) and reused
(`prefix_cache_hit_tokens`), and the tokens whose K/V arrived from another rank instead
(`kv_tokens_imported`: migrated sequences, a CFG branch's forked prefix); `invocations`
counts the finished invocations by (graph node, walk). Off for tensor-parallel nodes (their
followers replay the leader's page operations and cannot see its cache); a follower counts
what it replays.

Per-invocation inputs read from the environment: `input_ids` [n] (required), `positions`
([n] or [A, n]; default: the sequence's next position + arange, on every axis), `segments`
(list of (length, kind); default one causal segment), `chunk_mode` ("append" | "scratch"),
and the node's declared extras by name.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mstar.communication import messages as msg
from mstar.config.deployment import SchedulerConfig
from mstar.engine.attention_torch import TorchAttention
from mstar.engine.kv_cache import KVCacheManager, OutOfPages, SeqExport
from mstar.engine.prefix_cache import page_hashes, reusable_length
from mstar.engine.profiling import step_range
from mstar.engine.sampler import SampleRequest, sample, stop_reason
from mstar.engine.sequence import Chunk, SampledIds, SeqState
from mstar.engine.structured import GrammarStates
from mstar.engine.work import KeyedStepContext, NodeWork, RequestError, WorkResult
from mstar.events import TensorData
from mstar.graph.primitives import GraphNode
from mstar.model.contract import Fork, KVSpec
from mstar.model.forward import ForwardBatch, Segment, SeqChunk, SeqKey, attention_context
from mstar.model.sampling import SamplingParams


@dataclass
class StepRecord:
    """One forward of the node: who was in it (for tests, logs and metrics)."""

    step: int
    entries: list[dict[str, Any]]
    seconds: float = 0.0  # wall time of the node's forward


@dataclass
class SeqMigration:
    """One sequence leaving this engine: its state and its K/V (None when it was preempted:
    the destination rebuilds it from the history)."""

    state: SeqState
    kv: SeqExport | None


@dataclass(eq=False)  # tasks are compared by identity (`waiting.remove`)
class _Task:
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
    hashes: list[bytes] | None = None  # its full pages' prefix-cache hashes
    registered: int = 0  # pages of it registered in the prefix cache so far

    @property
    def n(self) -> int:
        return self.chunk.length

    @property
    def request_id(self) -> str:
        return self.key.request_id


def tp_step(node: str, fb: ForwardBatch, tasks: list[_Task]) -> msg.TPStep:
    """A leader's batch as the message its tensor-parallel followers replay."""
    seqs = [msg.TPSeq(c.key.request_id, c.key.label, c.key.child, c.length, c.context_len,
                      [(g.length, g.kind) for g in c.segments], c.mode, c.is_last_chunk,
                      dict(c.outputs), w.seed if w else 0, w.iteration if w else None,
                      ends=(w.node.name, w.walk) if w and c.is_last_chunk else None,
                      first=t.first)
            for c, t, w in ((c, t, t.work) for c, t in zip(fb.seqs, tasks))]
    return msg.TPStep(node, seqs, TensorData.from_tensor(fb.input_ids),
                      TensorData.from_tensor(fb.positions),
                      {k: TensorData.from_tensor(v) for k, v in fb.extras.items()})


def _segment_range(segments: list[Segment], k: int) -> tuple[int, int]:
    k = k if k >= 0 else len(segments) + k
    if not 0 <= k < len(segments):
        return (0, 0)
    start = sum(s.length for s in segments[:k])
    return (start, start + segments[k].length)


class KVEngine:
    """Runs one KV-cache node (and its branch nodes, which only differ by KV label)."""

    def __init__(self, node: str, module: torch.nn.Module, spec: KVSpec, cache: KVCacheManager,
                 *, max_seq_len: int, scheduler: SchedulerConfig,
                 eos_token_ids: tuple[int, ...] = (), device: torch.device | str = "cpu",
                 log_size: int = 10_000, tokenizer: Callable[[], Any] | None = None,
                 prefix_caching: bool = True):
        self.node = node
        self.module = module
        self.spec = spec
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.scheduler = scheduler
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        #: `response_format` state per sampled sequence (`tokenizer`: the model's, for it).
        self.grammar = GrammarStates(tokenizer)
        self.seqs: dict[SeqKey, SeqState] = {}
        self.waiting: list[_Task] = []
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=log_size)
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self._steps = itertools.count()
        self._extras = {e.name: e for e in spec.extras}
        self._defaults: dict[str, torch.Tensor] = {}  # see `_absent_extra`
        self.prefix_caching = prefix_caching
        #: Cumulative: tokens of sequences' first chunks run, taken from cached pages, and
        #: whose K/V arrived from another rank; requests preempted (pages dropped, rebuilt).
        self.counters = {"prompt_tokens_computed": 0, "prefix_cache_hit_tokens": 0,
                         "kv_tokens_imported": 0, "preemptions": 0}
        self.invocations: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Cumulative host time of the steps that ran a forward (seconds): planning them
        #: (`schedule`), building the batch, committing and sampling (`runner`), and the
        #: node's forward itself (`forward`); `steps` counts them. Cheap enough to stay on.
        self.timing = {"steps": 0, "schedule": 0.0, "runner": 0.0, "forward": 0.0}
        #: Tensor-parallel leader: sends every step and cache operation to the followers
        #: (set by the worker; None on a plain node or a follower).
        self.mirror: Callable[[Any], None] | None = None
        #: Emit an NVTX range around each forward (CUDA only; `--enable-nvtx`).
        self.nvtx = False
        #: The ranks sharding this node (leader first), () when it is not tensor parallel.
        self.tp_ranks: tuple[int, ...] = ()

    # -- request-level operations -----------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting)

    def fork(self, request_id: str, fork: Fork) -> None:
        src = SeqKey(request_id, self.node, fork.src_label, fork.src_child)
        dst = SeqKey(request_id, self.node, fork.label, fork.child)
        if src not in self.seqs:
            raise RequestError(f"cannot fork {src}: no such sequence on {self.node}")
        if dst in self.seqs:
            self.release_seq(dst)
        state = self.seqs[src]
        self.seqs[dst] = child = state.forked(dst, fork.length)
        if state.needs_recompute or state.recomputing:
            # The source's pages are gone or partial: the fork is rebuilt from its history
            # like any preempted sequence (a follower creates it at its first step).
            self.cache.create(dst)
            child.needs_recompute, child.admitted = bool(child.history), -1
            return
        self.cache.fork(src, dst, fork.length)
        self._mirror_op("fork", request_id, fork=fork)

    def release_seq(self, key: SeqKey) -> None:
        self.waiting = [t for t in self.waiting if t.key != key]
        self.seqs.pop(key, None)
        self.grammar.release(key)
        if self.cache.has(key):
            self.cache.free(key)
        self._mirror_op("free", key.request_id, key.label, key.child)

    def release(self, request_id: str) -> None:
        """Forget a finished, cancelled or failed request: its tasks, states and pages."""
        self.waiting = [t for t in self.waiting if t.request_id != request_id]
        for key in [k for k in self.seqs if k.request_id == request_id]:
            del self.seqs[key]
        self.cache.free_request(request_id)
        self.grammar.release_request(request_id)
        self._mirror_op("release", request_id)

    def pages_in_use(self) -> int:
        return self.cache.pool.num_used

    # -- migration (per-walk placement moves a request's sequences between ranks) -----------
    def export_request(self, request_id: str) -> list[SeqMigration]:
        """Every sequence of a request that has no queued work, with its K/V; the request
        stays here until `release`. Noise and sampling need no state: they are keyed by the
        request's seed."""
        if any(t.request_id == request_id for t in self.waiting):
            raise RuntimeError(f"request {request_id} still has work queued on {self.node}")
        return [self.export_seq(key) for key in self.seqs if key.request_id == request_id]

    def export_seq(self, key: SeqKey) -> SeqMigration:
        state = self.seqs[key]
        return SeqMigration(state, None if state.needs_recompute else self.cache.export(key))

    def import_request(self, migrations: list[SeqMigration]) -> None:
        """Adopt exported sequences (raises OutOfPages, leaving nothing behind)."""
        if self.mirror is not None:
            raise RequestError(f"{self.node} is tensor parallel: its sequences cannot "
                               "migrate (place its walks on the same ranks)")
        done: list[SeqKey] = []
        try:
            for m in migrations:
                key = m.state.key
                if m.kv is None:
                    self.cache.create(key)
                    state = dataclasses.replace(m.state, needs_recompute=bool(m.state.history),
                                                admitted=-1)
                else:
                    self.cache.import_sequence(key, m.kv)
                    state = dataclasses.replace(m.state, admitted=next(self._admissions))
                self.seqs[key] = state
                done.append(key)
        except OutOfPages:
            for key in done:
                self.release_seq(key)
            raise
        self.counters["kv_tokens_imported"] += sum(m.kv.length for m in migrations
                                                   if m.kv is not None)

    # -- tensor-parallel followers replay the leader ----------------------------------------
    def _mirror_op(self, kind: str, request_id: str, label: str = "main", child: int = 0,
                   fork: Fork | None = None) -> None:
        if self.mirror is not None:
            self.mirror(msg.TPOp(self.node, kind, request_id, label, child, fork))

    def apply(self, op: msg.TPOp) -> None:
        """A follower: the leader's cache operation."""
        key = SeqKey(op.request_id, self.node, op.label, op.child)
        if op.kind == "fork" and op.fork is not None:
            f = op.fork
            self.cache.fork(SeqKey(op.request_id, self.node, f.src_label, f.src_child),
                            SeqKey(op.request_id, self.node, f.label, f.child), f.length)
        elif op.kind in ("free", "reset") and self.cache.has(key):
            self.cache.free(key)
            if op.kind == "reset":
                self.cache.create(key)
        elif op.kind == "release":
            self.cache.free_request(op.request_id)

    def follow(self, step: msg.TPStep) -> None:
        """A follower: run the leader's batch on this shard, with the same cache ops."""
        chunks, works, start = [], [], 0
        for s in step.seqs:
            key = SeqKey(s.request_id, self.node, s.label, s.child)
            if not self.cache.has(key):
                self.cache.create(key)
            if s.mode == "append":
                self.cache.reserve(key, s.take)
            chunks.append(SeqChunk(key=key, start=start, length=s.take,
                                   context_len=s.context_len,
                                   segments=[Segment(n, kind) for n, kind in s.segments],
                                   mode=s.mode, is_last_chunk=s.is_last,
                                   outputs={k: tuple(v) for k, v in s.outputs.items()}))
            works.append(NodeWork(s.request_id, s.child, GraphNode(self.node), {}, s.seed,
                                  SamplingParams(), iteration=s.iteration))
            start += s.take
        fb = ForwardBatch(input_ids=step.input_ids.to_tensor().to(self.device),
                          positions=step.positions.to_tensor().to(self.device), seqs=chunks,
                          extras={k: v.to_tensor().to(self.device)
                                  for k, v in step.extras.items()},
                          ctx=KeyedStepContext(works))
        with torch.inference_mode(), attention_context(TorchAttention(chunks,
                                                                      cache=self.cache)):
            self.module(fb)
        for c, s in zip(chunks, step.seqs):
            if c.mode == "append":
                self.cache.commit(c.key, c.length)
            if s.first:
                self.counters["prompt_tokens_computed"] += s.take
            if s.ends is not None:
                self.invocations[s.ends] += 1

    # -- submission -------------------------------------------------------------------------
    def submit(self, work: NodeWork) -> None:
        """Queue one invocation; bad inputs raise RequestError before anything runs."""
        inputs = work.inputs
        if "input_ids" not in inputs:
            raise RequestError(f"{work.node.name}: missing input 'input_ids'")
        ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long).reshape(-1)
        n = int(ids.shape[0])
        if n == 0:
            raise RequestError(f"{work.node.name}: empty input_ids")
        segments = [s if isinstance(s, Segment) else Segment(int(s[0]), str(s[1]))
                    for s in inputs.get("segments") or [(n, "causal")]]
        if sum(s.length for s in segments) != n or any(
                s.kind not in ("causal", "bidirectional") or s.length <= 0 for s in segments):
            raise RequestError(f"{work.node.name}: segments {segments} do not cover {n} tokens")
        mode = inputs.get("chunk_mode", "append")
        if mode not in ("append", "scratch"):
            raise RequestError(f"chunk_mode must be 'append' or 'scratch', got {mode!r}")
        key = SeqKey(work.request_id, self.node, work.node.label, work.child)
        state = self.seqs.get(key)
        if state is None:
            state = self.seqs[key] = SeqState(key)
            self.cache.create(key)
        key = state.key  # the dicts' own key object: later lookups match it by identity
        if mode == "append" and state.length + n > self.max_seq_len:
            raise RequestError(
                f"sequence of {state.length + n} tokens exceeds max_seq_len={self.max_seq_len}",
                param="max_seq_len")
        positions = self._positions(inputs.get("positions"), state, n)
        token_extras, seq_extras = self._extras_for(inputs, n)
        wanted = {name: at for name, at in self.spec.outputs.items()
                  if name in work.node.outputs
                  or (name == "logits" and "token_ids" in work.node.outputs)}
        task = _Task(work=work, key=key, chunk=Chunk(ids.to(self.device), positions, segments,
                                                     token_extras, seq_extras),
                     mode=mode, wanted=wanted, samples="token_ids" in work.node.outputs,
                     arrival=next(self._arrivals))
        self.waiting.append(task)

    def _positions(self, given: Any, state: SeqState, n: int) -> torch.Tensor:
        axes = self.spec.position_axes
        if given is None:
            pos = torch.arange(state.next_position, state.next_position + n)
            return pos.unsqueeze(0).expand(axes, n).contiguous().to(self.device)
        pos = torch.as_tensor(given, dtype=torch.long)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0).expand(axes, -1)
        if tuple(pos.shape) != (axes, n):
            raise RequestError(f"positions of shape {tuple(pos.shape)}; expected ({axes}, {n})")
        return pos.contiguous().to(self.device)

    def _extras_for(self, inputs: dict[str, Any], n: int):
        """The extras this invocation supplies (absent ones get defaults at batch time)."""
        token_extras: dict[str, torch.Tensor] = {}
        seq_extras: dict[str, torch.Tensor] = {}
        for name, ex in self._extras.items():
            value = inputs.get(name)
            if value is None:
                continue
            shape = ((n,) if ex.per == "token" else ()) + tuple(ex.shape)
            t = torch.as_tensor(value).to(self.device, ex.dtype)
            if tuple(t.shape) != shape:
                raise RequestError(f"extra {name!r} has shape {tuple(t.shape)}; "
                                   f"expected {shape}")
            (token_extras if ex.per == "token" else seq_extras)[name] = t
        return token_extras, seq_extras

    def default_extra(self, name: str, rows: int | None) -> torch.Tensor:
        """Extra `name` as if nobody supplied it: `rows` rows, or one per-seq value."""
        ex = self._extras[name]
        shape = ((rows,) if rows is not None else ()) + tuple(ex.shape)
        return torch.full(shape, ex.default, dtype=ex.dtype, device=self.device)

    def _absent_extra(self, name: str, rows: int) -> torch.Tensor:
        """`default_extra(name, rows)` for a batch where nobody supplied it: a view of one
        cached tensor (grown when a batch is larger), not a fresh one each step."""
        cached = self._defaults.get(name)
        if cached is None or cached.shape[0] < rows:
            cached = self._defaults[name] = self.default_extra(name, max(rows, 256))
        return cached[:rows]

    def _batch_extras(self, pieces: list[Chunk]) -> dict[str, torch.Tensor]:
        extras: dict[str, torch.Tensor] = {}
        total = sum(p.length for p in pieces)
        for name, ex in self._extras.items():
            if ex.per == "token":
                if not any(name in p.token_extras for p in pieces):
                    extras[name] = self._absent_extra(name, total)
                else:
                    extras[name] = torch.cat([p.token_extras[name] if name in p.token_extras
                                              else self.default_extra(name, p.length)
                                              for p in pieces])
            elif not any(name in p.seq_extras for p in pieces):
                extras[name] = self._absent_extra(name, len(pieces))
            else:
                extras[name] = torch.stack([p.seq_extras[name] if name in p.seq_extras
                                            else self.default_extra(name, None) for p in pieces])
        return extras

    # -- scheduling -------------------------------------------------------------------------
    def _chunk_len(self, task: _Task, budget: int, batch_empty: bool) -> int:
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

    def _preempt_one(self, protect: set[str]) -> bool:
        """Drop the pages of the most recently admitted request not in `protect`."""
        holders = [s for s in self.seqs.values() if s.admitted >= 0 and not s.needs_recompute
                   and s.key.request_id not in protect and self.cache.has(s.key)
                   and self.cache.capacity(s.key) > 0]
        if not holders:
            return False
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
        # A half-done recompute is dropped: `_schedule` starts a fresh one from the history.
        self.waiting = [t for t in self.waiting if t.request_id != victim or t.work is not None]
        return True

    def _start_recompute(self, state: SeqState) -> None:
        state.needs_recompute = False
        state.recomputing = True
        task = _Task(work=None, key=state.key,
                     chunk=Chunk.concat(state.history, fill=self.default_extra),
                     mode="append", wanted={}, samples=False, arrival=-1)
        self.waiting.insert(0, task)

    def _schedule(self) -> tuple[list[tuple[_Task, int]], list[WorkResult]]:
        budget = self.scheduler.max_num_batched_tokens
        batch: list[tuple[_Task, int]] = []
        failed: list[WorkResult] = []
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
            if len(batch) >= self.scheduler.max_num_seqs or budget <= 0:
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
            if task.done == 0 and task.mode == "append" and self.cache.length(task.key) == 0:
                task.first = True
                reused = self._reuse_prefix(task)
            else:
                reused = 0
            take = self._chunk_len(task, budget, not batch)
            if take == 0:
                self._undo_reuse(task, reused)
                continue
            if task.mode == "append":
                while True:
                    try:
                        self.cache.reserve(task.key, take)
                        break
                    except OutOfPages:
                        if not self._preempt_one(in_batch | {task.request_id}):
                            break
                if self.cache.pages_needed(task.key, take):  # new or copy-on-write pages
                    self._undo_reuse(task, reused)
                    others = any(s.admitted >= 0 and s.key.request_id != task.request_id
                                 for s in self.seqs.values())
                    if not batch and not others:
                        gone.add(task.request_id)
                        pool = self.cache.pool
                        failed.extend(self._fail_request(task.request_id, RequestError(
                            f"the KV cache of {self.node} cannot hold this request: its "
                            f"{pool.num_pages} pages of {pool.page_size} tokens hold "
                            f"{pool.num_pages * pool.page_size} tokens", code=507)))
                    admitting_new = admitting_new and not is_new
                    continue
            if state.admitted < 0:
                state.admitted = next(self._admissions)
            if reused and task.work is not None:
                self._record(state, task.chunk.slice(0, reused))
            if task.first:
                self.counters["prefix_cache_hit_tokens"] += reused
                self.counters["prompt_tokens_computed"] += take
            batch.append((task, take))
            in_batch.add(task.request_id)
            budget -= take
        return batch, failed

    # -- prefix caching ---------------------------------------------------------------------
    def _reuse_prefix(self, task: _Task) -> int:
        """Start the empty sequence of `task` (its first chunk) from the cached pages of the
        chunk's longest cached prefix; returns the tokens reused (0 when off). Stops before
        the first token whose outputs are wanted (at least the last token runs) and never
        inside a bidirectional segment."""
        if not self.prefix_caching or self.tp_ranks:
            return 0
        ps = self.cache.pool.page_size
        chunk = task.chunk
        if task.hashes is None:
            extras = self._batch_extras([chunk])  # exactly what the forward would see
            task.hashes = page_hashes(
                chunk.input_ids, chunk.positions, chunk.segments,
                {k: v for k, v in extras.items() if self._extras[k].per == "token"},
                {k: v for k, v in extras.items() if self._extras[k].per == "seq"},
                page_size=ps, salt=f"{self.node}|{task.key.label}|{self.cache.pool.spec.dtype}")
        pages = self.cache.match_prefix(task.hashes)
        if not pages:
            return 0
        limit = task.n - 1
        for at in task.wanted.values():
            if at == "all":
                limit = 0
            elif at.startswith("segment:"):
                limit = min(limit, _segment_range(chunk.segments, int(at.split(":", 1)[1]))[0])
        reused = reusable_length(len(pages) * ps, chunk.segments, limit, ps)
        if reused:
            self.cache.adopt(task.key, pages[:reused // ps])
            task.done = reused
        return reused

    def _undo_reuse(self, task: _Task, reused: int) -> None:
        """The task could not be scheduled after all: give its adopted pages back."""
        if reused:
            self.cache.truncate(task.key, 0)
            task.done = 0

    @staticmethod
    def _record(state: SeqState, piece: Chunk, ids: list[int] | None = None,
                top: int | None = None) -> None:
        """`piece` is now in the sequence's cache: remember it (recompute, forks, sampling
        penalties, next position). `ids` and `top` (its largest first-axis position) may
        come from the whole batch's host copy, saving a device read per sequence."""
        state.history.append(piece)
        state.appended_ids.extend(piece.input_ids.tolist() if ids is None else ids)
        top = int(piece.positions[0].max()) if top is None else top
        state.next_position = max(state.next_position, top + 1)

    def _fail(self, task: _Task, error: Exception) -> list[WorkResult]:
        if task.work is None:
            return self._fail_request(task.request_id, error)
        self.waiting.remove(task)
        return [WorkResult(task.work, error=error)]

    def _fail_request(self, request_id: str, error: Exception) -> list[WorkResult]:
        mine = [t for t in self.waiting if t.request_id == request_id]
        self.waiting = [t for t in self.waiting if t.request_id != request_id]
        return [WorkResult(t.work, error=error) for t in mine if t.work is not None]

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[WorkResult]:
        started = time.perf_counter()
        batch, results = self._schedule()
        if not batch:
            return results
        planned = time.perf_counter()
        forward_before = self.timing["forward"]
        try:
            return results + self._run(batch)
        finally:
            ended = time.perf_counter()
            forward = self.timing["forward"] - forward_before
            self.timing["steps"] += 1
            self.timing["schedule"] += planned - started
            self.timing["runner"] += ended - planned - forward

    def _run(self, batch: list[tuple[_Task, int]]) -> list[WorkResult]:
        """Forward the scheduled batch (isolating a failing invocation) and commit it."""
        results: list[WorkResult] = []
        try:
            ran = [(batch, self._forward(batch))]
        except Exception as exc:  # isolate the failing invocation; the others go on
            if len(batch) == 1:
                return self._fail(batch[0][0], exc)
            ran = []
            for item in batch:
                try:
                    ran.append(([item], self._forward([item])))
                except Exception as single_exc:
                    results.extend(self._fail(item[0], single_exc))
        for part, forward in ran:  # nothing was committed before every forward ran
            results.extend(self._commit(part, *forward))
        return results

    def _forward(self, batch: list[tuple[_Task, int]]
                 ) -> tuple[list[SeqChunk], list[Chunk], ForwardBatch, dict[str, torch.Tensor]]:
        """Run the node on `batch`; changes no state (a failure is the batch's input)."""
        seq_chunks: list[SeqChunk] = []
        pieces: list[Chunk] = []
        start = 0
        for task, take in batch:
            a, b = task.done, task.done + take
            piece = task.chunk if (a, b) == (0, task.n) else task.chunk.slice(a, b)
            pieces.append(piece)
            outputs: dict[str, tuple[int, int]] = {}
            for name, at in task.wanted.items():
                if at == "last":
                    lo, hi = (task.n - 1, task.n)
                elif at == "all":
                    lo, hi = (0, task.n)
                else:
                    lo, hi = _segment_range(task.chunk.segments, int(at.split(":", 1)[1]))
                lo, hi = max(lo, a), min(hi, b)
                if lo < hi:
                    outputs[name] = (lo - a, hi - lo)
            seq_chunks.append(SeqChunk(key=task.key, start=start, length=take,
                                       context_len=self.cache.length(task.key),
                                       segments=piece.segments, mode=task.mode,
                                       is_last_chunk=b == task.n, outputs=outputs))
            start += take
        works = [t.work for t, _ in batch]
        extras = self._batch_extras(pieces)
        fb = ForwardBatch(input_ids=torch.cat([p.input_ids for p in pieces]),
                          positions=torch.cat([p.positions for p in pieces], dim=1),
                          seqs=seq_chunks, extras=extras, ctx=KeyedStepContext(works))
        if self.spec.position_axes == 1:
            fb.positions = fb.positions[0]
        if self.mirror is not None:
            self.mirror(tp_step(self.node, fb, [t for t, _ in batch]))
        attention = TorchAttention(seq_chunks, cache=self.cache)
        started = time.perf_counter()
        with torch.inference_mode(), step_range(f"{self.node} step", self.nvtx), \
                attention_context(attention):
            out = self.module(fb)
        seconds = time.perf_counter() - started
        self.timing["forward"] += seconds
        self._log(batch, seconds)
        return seq_chunks, pieces, fb, out

    def _commit(self, batch: list[tuple[_Task, int]], seq_chunks: list[SeqChunk],
                pieces: list[Chunk], fb: ForwardBatch,
                out: dict[str, torch.Tensor]) -> list[WorkResult]:
        """The forward's K/V into the sequences, its outputs to their tasks; finished
        invocations' results."""
        finished: list[_Task] = []
        ids = fb.input_ids.tolist()
        positions = (fb.positions if fb.positions.dim() == 1 else fb.positions[0]).tolist()
        for i, (task, take) in enumerate(batch):
            if task.mode == "append":
                self.cache.commit(task.key, take)
                if task.work is not None:
                    rows = slice(seq_chunks[i].start, seq_chunks[i].start + take)
                    self._record(self.seqs[task.key], pieces[i], ids[rows], max(positions[rows]))
                if task.hashes:
                    task.registered = self.cache.register(task.key, task.hashes,
                                                          task.registered)
            task.done += take
            if task.done == task.n:
                finished.append(task)
        for name, value in out.items():
            holders = fb.output_seqs(name)
            counts = [seq_chunks[i].outputs[name][1] for i in holders]
            for i, part in zip(holders, torch.split(value, counts)):
                batch[i][0].pieces.setdefault(name, []).append(part)
        return self._finish(finished)

    def _finish(self, finished: list[_Task]) -> list[WorkResult]:
        results: list[WorkResult] = []
        to_sample: list[_Task] = []
        if finished:
            gone = set(finished)
            self.waiting = [t for t in self.waiting if t not in gone]
        for task in finished:
            if task.work is None:
                self.seqs[task.key].recomputing = False
                continue
            self.invocations[(task.work.node.name, task.work.walk)] += 1
            if task.samples:
                to_sample.append(task)
            else:
                results.append(WorkResult(task.work, self._outputs(task)))
        if to_sample:
            try:
                results.extend(self._sample(to_sample))
            except Exception:  # a request's logits processor raised: it fails alone
                for task in to_sample:
                    try:
                        results.extend(self._sample([task]))
                    except Exception as exc:
                        results.append(WorkResult(task.work, error=exc))
        return results

    def _outputs(self, task: _Task) -> dict[str, Any]:
        return {name: torch.cat(parts) for name, parts in task.pieces.items()
                if name in task.work.node.outputs}

    def _sample(self, tasks: list[_Task]) -> list[WorkResult]:
        logits = torch.cat([t.pieces["logits"][-1][-1:] for t in tasks]).float()
        rows = []
        for t in tasks:
            state = self.seqs[t.key]
            rows.append(SampleRequest(params=t.work.sampling, seed=t.work.seed,
                                      child=t.work.child, site=t.work.node.name,
                                      step=self.cache.length(t.key),
                                      history=SampledIds(state.sampled),
                                      prompt_ids=state.appended_ids, key=t.key))
        result = sample(logits, rows, self.grammar)
        tokens = result.token_ids.tolist()
        token_rows = result.token_ids.cpu().split(1)  # each row's `token_ids` output, one op
        results = []
        for i, t in enumerate(tasks):
            if i in result.failed:
                results.append(WorkResult(t.work, error=RequestError(
                    result.failed[i], param="response_format")))
                continue
            state = self.seqs[t.key]
            token = tokens[i]
            position = self.cache.length(t.key)
            state.sampled.append((position, token))
            reason = stop_reason(token, t.work.sampling, num_generated=len(state.sampled),
                                 seq_len=position + 1, max_seq_len=self.max_seq_len,
                                 eos_token_ids=self.eos_token_ids)
            outputs = self._outputs(t)
            outputs.update(token_ids=token_rows[i], finished=reason is not None,
                           finish_reason=reason)
            if t.work.sampling.logprobs is not None and result.logprobs is not None:
                outputs["logprobs"] = [[token, float(result.logprobs[i]),
                                        [list(p) for p in result.top_logprobs[i]]]]
            results.append(WorkResult(t.work, outputs))
        return results

    def _log(self, batch: list[tuple[_Task, int]], seconds: float) -> None:
        entries = []
        for task, take in batch:
            w = task.work
            entries.append({
                "request_id": task.request_id, "label": task.key.label, "child": task.key.child,
                "walk": w.walk if w else "recompute", "node": w.node.name if w else self.node,
                "iteration": w.iteration if w else None, "tokens": take, "mode": task.mode,
            })
        self.step_log.append(StepRecord(next(self._steps), entries, seconds))
