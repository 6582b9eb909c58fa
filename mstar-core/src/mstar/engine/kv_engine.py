"""The KV-cache engine: continuous batching of one KV node's invocations over a paged cache.

Each `step` is a hand-off: the scheduler (`kv_scheduler.KVScheduler`) decides the work
under a token budget (running sequences first, then new ones; a prefill is cut into chunks,
never inside a bidirectional segment) and reserves its pages (preempting the most recently
admitted other request when they run out: its pages are dropped and rebuilt later from its
history, "preemption by recompute"), returning a `StepPlan`; the runner
(`kv_runner.KVRunner`) builds one ragged `ForwardBatch` for all of it, runs the node once
under an attention backend, commits the K/V, samples `logits` into `token_ids`, and returns
the finished invocations' outputs. Prefills, decode steps and denoising steps of different
requests and walks share one forward. This class is the façade the worker uses: submission,
forks, release, migration and tensor-parallel replay.

Prefix caching: the first chunk of a new sequence (a prompt, or the rebuild of a preempted
one) starts from the longest run of its full pages already in the cache (`prefix_cache`
hashes everything that determines a page's K/V) and computes only the rest; its own full
pages are registered once the step that wrote them is done. `counters` counts the tokens of
such first chunks that were run (`prompt_tokens_computed`) and reused
(`prefix_cache_hit_tokens`), and the tokens whose K/V arrived from another rank instead
(`kv_tokens_imported`: migrated sequences, a CFG branch's forked prefix); `invocations`
counts the finished invocations by (graph node, walk). Under tensor parallelism the
leader's adoption is part of the step it mirrors (the follower adopts the same pages and
registers the same hashes; it takes the very pages the leader allocated, so evictions are
the leader's); a follower counts what it replays, cache hits included.

Migration under tensor parallelism moves whole K/V (`kv_shards`): the leader gathers every
rank's shard of an exported sequence, and splits an imported one over its group.

Per-invocation inputs read from the environment: `input_ids` [n] (required), `positions`
([n] or [A, n], or an int: the first of n consecutive positions on every axis, as text runs
after multi-axis media; default: the sequence's next position), `segments`
(list of (length, kind); default one causal segment), `chunk_mode` ("append" | "scratch"),
and the node's declared extras by name.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mstar.communication import messages as msg
from mstar.config.deployment import SchedulerConfig
from mstar.engine.kv_cache import KVCacheManager, OutOfPages, SeqExport
from mstar.engine.kv_runner import KVRunner, StepRecord
from mstar.engine.kv_scheduler import KVScheduler, Task
from mstar.engine.kv_shards import gather_heads, scatter_heads, split_heads
from mstar.engine.sequence import Chunk, SeqState
from mstar.engine.structured import GrammarStates
from mstar.engine.work import NodeWork, WorkResult
from mstar.errors import RequestError
from mstar.model.contract import Fork, KVSpec
from mstar.model.forward import Segment, SeqKey


def _long_tensor(value: Any) -> torch.Tensor:
    """`value` as a long tensor; a long tensor as it is. Submission runs for every sequence
    at every step, and each torch call releases the GIL (to be won back from the threads
    serving clients), so calls that would change nothing are not made."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.long:
        return value
    return torch.as_tensor(value, dtype=torch.long)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` (itself when it is there already; see `_long_tensor`)."""
    return t if t.device == device else t.to(device)


@dataclass
class SeqMigration:
    """One sequence leaving this engine: its state and its K/V (None when it was preempted:
    the destination rebuilds it from the history)."""

    state: SeqState
    kv: SeqExport | None


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
        #: consecutive positions on every axis, sliced for runs (see `_positions`)
        self._runs = torch.arange(max_seq_len + 1, device=device).expand(
            spec.position_axes, -1)
        #: start -> the one-token run there (a decode step's positions), made once
        self._one_token_runs: dict[int, torch.Tensor] = {}
        self.scheduler = scheduler
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        #: `response_format` state per sampled sequence (`tokenizer`: the model's, for it).
        self.grammar = GrammarStates(tokenizer)
        self.seqs: dict[SeqKey, SeqState] = {}
        self._extras = {e.name: e for e in spec.extras}
        #: Cumulative: tokens of sequences' first chunks run, taken from cached pages, and
        #: whose K/V arrived from another rank; requests preempted (pages dropped, rebuilt);
        #: first chunks and scratch chunks run in a step beside other sequences (requests
        #: sharing a batched prefill, a batched denoising step).
        self.counters = {"prompt_tokens_computed": 0, "prefix_cache_hit_tokens": 0,
                         "kv_tokens_imported": 0, "preemptions": 0, "batched_prompts": 0,
                         "batched_scratch_chunks": 0}
        self.invocations: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Cumulative host time of the steps that ran a forward (seconds): planning them
        #: (`schedule`: the scheduler), building the batch, committing and sampling
        #: (`runner`: the runner outside the forward), and the node's forward itself
        #: (`forward`); `steps` counts them. Cheap enough to stay on.
        self.timing = {"steps": 0, "schedule": 0.0, "runner": 0.0, "forward": 0.0}
        #: Decides each step (`StepPlan`); owns the queue (`waiting`).
        self.kv_scheduler = KVScheduler(
            node, spec, cache, self.seqs, scheduler, self.counters,
            prefix_caching=prefix_caching, batch_extras=self._batch_extras,
            default_extra=self.default_extra, mirror_op=self._mirror_op)
        #: Carries out each plan: batch, forward under the attention backend, commit, sample.
        self.runner = KVRunner(
            node, module, spec, cache, self.seqs, self.kv_scheduler, device=self.device,
            max_seq_len=max_seq_len, eos_token_ids=self.eos_token_ids, grammar=self.grammar,
            invocations=self.invocations, timing=self.timing, log_size=log_size)

    # -- the scheduler's and runner's state, as attributes of the engine --------------------
    @property
    def waiting(self) -> list[Task]:
        return self.kv_scheduler.waiting

    @waiting.setter
    def waiting(self, tasks: list[Task]) -> None:
        self.kv_scheduler.waiting = tasks

    @property
    def step_log(self) -> collections.deque[StepRecord]:
        return self.runner.step_log

    @property
    def prefix_caching(self) -> bool:
        return self.kv_scheduler.prefix_caching

    @property
    def tp_ranks(self) -> tuple[int, ...]:
        """The ranks sharding this node (leader first), () when it is not tensor parallel."""
        return self.kv_scheduler.tp_ranks

    @tp_ranks.setter
    def tp_ranks(self, ranks: tuple[int, ...]) -> None:
        self.kv_scheduler.tp_ranks = ranks

    @property
    def tp_group(self) -> Any:
        """The torch.distributed group of a tensor-parallel node's ranks (set with
        `tp_ranks` by the builder): whole K/V in and out of it (`kv_shards`), the leader's
        in-node draws to its followers (`KeyedStepContext`)."""
        return self.runner.tp_group

    @tp_group.setter
    def tp_group(self, group: Any) -> None:
        self.runner.tp_group = group

    @property
    def tp_size(self) -> int:
        return max(1, len(self.tp_ranks))

    @property
    def mirror(self) -> Callable[[Any], None] | None:
        """Tensor-parallel leader: sends every step and cache operation to the followers
        (set by the worker; None on a plain node or a follower)."""
        return self.runner.mirror

    @mirror.setter
    def mirror(self, send: Callable[[Any], None] | None) -> None:
        self.runner.mirror = send

    @property
    def nvtx(self) -> bool:
        """Emit an NVTX range around each forward (CUDA only; `--enable-nvtx`)."""
        return self.runner.nvtx

    @nvtx.setter
    def nvtx(self, on: bool) -> None:
        self.runner.nvtx = on

    def _batch_extras(self, pieces: list[Chunk]) -> dict[str, torch.Tensor]:
        return self.runner.batch_extras(pieces)

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
        """One sequence with its whole K/V: a tensor-parallel leader gathers its
        followers' shards (they join when they handle the mirrored "export")."""
        state = self.seqs[key]
        if state.needs_recompute:
            return SeqMigration(state, None)
        exported = self.cache.export(key)
        if self.mirror is not None and exported.length:  # (a follower may lack an empty one)
            self._mirror_op("export", key.request_id, key.label, key.child)
            exported.kv = gather_heads(exported.kv, self.tp_group, self.tp_size)
        return SeqMigration(state, exported)

    def import_request(self, migrations: list[SeqMigration]) -> None:
        """Adopt exported sequences, each with its whole K/V (raises OutOfPages, leaving
        nothing behind). A tensor-parallel leader keeps its heads and hands each follower
        its own, into the same pages."""
        done: list[SeqKey] = []
        try:
            for m in migrations:
                key = m.state.key
                if m.kv is None:
                    self.cache.create(key)
                    state = dataclasses.replace(m.state, needs_recompute=bool(m.state.history),
                                                admitted=-1)
                else:
                    shards = split_heads(m.kv.kv.to(self.device), self.tp_size)  # (NCCL)
                    self.cache.import_sequence(key, SeqExport(m.kv.length, shards[0]))
                    if self.mirror is not None and m.kv.length:
                        self._mirror_op("import", key.request_id, key.label, key.child,
                                        pages=self.cache.page_table(key), length=m.kv.length)
                        scatter_heads(shards, shards[0], self.tp_group)
                    state = dataclasses.replace(m.state,
                                                admitted=self.kv_scheduler.next_admission())
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
                   fork: Fork | None = None, pages: list[int] | None = None,
                   length: int = 0) -> None:
        if self.mirror is not None:
            self.mirror(msg.TPOp(self.node, kind, request_id, label, child, fork,
                                 pages or [], length))

    def apply(self, op: msg.TPOp) -> None:
        """A follower: the leader's cache operation."""
        key = SeqKey(op.request_id, self.node, op.label, op.child)
        if op.kind == "export":
            gather_heads(self.cache.export(key).kv, self.tp_group, self.tp_size)
        elif op.kind == "import":
            spec = self.cache.pool.spec
            like = torch.empty(spec.num_layers, 2, op.length, spec.num_kv_heads,
                               spec.head_dim, dtype=spec.dtype, device=self.device)
            shard = scatter_heads(None, like, self.tp_group)
            self.cache.import_sequence(key, SeqExport(op.length, shard), pages=op.pages)
            self.counters["kv_tokens_imported"] += op.length
        elif op.kind == "fork" and op.fork is not None:
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
        self.counters["prefix_cache_hit_tokens"] += self.runner.replay(step)
        self.counters["prompt_tokens_computed"] += sum(s.take for s in step.seqs if s.first)

    # -- submission -------------------------------------------------------------------------
    def submit(self, work: NodeWork) -> None:
        """Queue one invocation; bad inputs raise RequestError before anything runs."""
        inputs = work.inputs
        if "input_ids" not in inputs:
            raise RequestError(f"{work.node.name}: missing input 'input_ids'")
        ids = _long_tensor(inputs["input_ids"])
        ids = ids if ids.dim() == 1 else ids.reshape(-1)
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
        task = Task(work=work, key=key, chunk=Chunk(_on(ids, self.device), positions, segments,
                                                     token_extras, seq_extras),
                     mode=mode, wanted=wanted, samples="token_ids" in work.node.outputs)
        self.kv_scheduler.add(task)

    def _positions(self, given: Any, state: SeqState, n: int) -> torch.Tensor:
        """[axes, n] positions, possibly a view (an axis expanded): they are only read, and
        batches concatenate them. A run (None, or an int start) is a slice of one table
        kept per engine; a one-token run is made once per position and reused by every
        sequence's decode step there."""
        axes = self.spec.position_axes
        if given is None or isinstance(given, int):
            start = state.next_position if given is None else given
            if n == 1 and (one := self._one_token_runs.get(start)) is not None:
                return one  # a decode step: no torch call at all
            if start < 0:
                raise RequestError(f"positions must be >= 0, got {start}")
            if start + n > self._runs.shape[1]:
                self._runs = torch.arange(2 * (start + n), device=self.device).expand(axes, -1)
            run = self._runs[:, start:start + n]
            if n == 1:
                self._one_token_runs[start] = run
            return run
        pos = _long_tensor(given)
        if pos.dim() == 1:
            pos = pos.expand(axes, -1)
        if tuple(pos.shape) != (axes, n):
            raise RequestError(f"positions of shape {tuple(pos.shape)}; expected ({axes}, {n})")
        return _on(pos, self.device)

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
        return self.runner.default_extra(name, rows)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[WorkResult]:
        """Plan one step (the scheduler) and carry it out (the runner)."""
        started = time.perf_counter()
        plan = self.kv_scheduler.schedule()
        if not plan.entries:
            return list(plan.failed)
        planned = time.perf_counter()
        if len(plan.entries) > 1:
            self.counters["batched_prompts"] += sum(e.task.first for e in plan.entries)
            self.counters["batched_scratch_chunks"] += sum(e.task.mode == "scratch"
                                                           for e in plan.entries)
        forward_before = self.timing["forward"]
        try:
            return list(plan.failed) + self.runner.run(plan)
        finally:
            ended = time.perf_counter()
            forward = self.timing["forward"] - forward_before
            self.timing["steps"] += 1
            self.timing["schedule"] += planned - started
            self.timing["runner"] += ended - planned - forward
