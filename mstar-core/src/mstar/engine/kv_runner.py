"""The KV engine's runner: carries out a `StepPlan`.

It builds the ragged `ForwardBatch` of the plan's entries, runs the node once under an
attention backend (`TorchAttention`, the reference; the place where CUDA graphs and other
backends plug in), commits the new K/V into the sequences, gathers each invocation's
outputs, samples `logits` into `token_ids`, and logs the step. A failing forward is retried
per invocation so that only the failing one fails.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mstar.communication import messages as msg
from mstar.engine.attention_torch import TorchAttention
from mstar.engine.kv_cache import KVCacheManager
from mstar.engine.kv_scheduler import KVScheduler, PlanEntry, StepPlan, Task, record, segment_range
from mstar.engine.profiling import step_range
from mstar.engine.sampler import SampleRequest, sample, stop_reason
from mstar.engine.sequence import Chunk, SampledIds, SeqState
from mstar.engine.structured import GrammarStates
from mstar.engine.work import KeyedStepContext, NodeWork, WorkResult
from mstar.errors import RequestError
from mstar.events import TensorData
from mstar.graph.primitives import GraphNode
from mstar.model.contract import KVSpec
from mstar.model.forward import (
    AttentionBackend,
    ForwardBatch,
    Segment,
    SeqChunk,
    SeqKey,
    attention_context,
)
from mstar.model.sampling import SamplingParams


@dataclass
class StepRecord:
    """One forward of the node: who was in it (for tests, logs and metrics)."""

    step: int
    entries: list[dict[str, Any]]
    seconds: float = 0.0  # wall time of the node's forward


def tp_step(node: str, fb: ForwardBatch, entries: list[PlanEntry],
            cache: KVCacheManager) -> msg.TPStep:
    """A leader's batch as the message its tensor-parallel followers replay, with its cache
    decisions: pages adopted from the prefix cache, the pages it reserved, the hashes it
    will register."""
    ps = cache.pool.page_size
    seqs = []
    for c, e in zip(fb.seqs, entries):
        t, w = e.task, e.task.work
        append = c.mode == "append"
        seqs.append(msg.TPSeq(
            c.key.request_id, c.key.label, c.key.child, c.length, c.context_len,
            [(g.length, g.kind) for g in c.segments], c.mode, c.is_last_chunk,
            dict(c.outputs), w.seed if w else 0, w.iteration if w else None,
            ends=(w.node.name, w.walk) if w and c.is_last_chunk else None,
            first=t.first, outer=w.outer if w else (), join_round=w.join_round if w else None,
            adopted=list(e.adopted),
            pages=cache.page_table(c.key)[c.context_len // ps:] if append else [],
            hashes=list(t.hashes or []) if append else [], register_from=t.registered))
    return msg.TPStep(node, seqs, TensorData.from_tensor(fb.input_ids),
                      TensorData.from_tensor(fb.positions),
                      {k: TensorData.from_tensor(v) for k, v in fb.extras.items()})


def torch_attention(seqs: list[SeqChunk], cache: KVCacheManager) -> AttentionBackend:
    """The reference attention backend of one step."""
    return TorchAttention(seqs, cache=cache)


def _on_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU, without a call (a GIL hand-off, see `kv_engine`) when it is there."""
    return t if t.device.type == "cpu" else t.cpu()


_Forward = tuple[list[SeqChunk], list[Chunk], ForwardBatch, dict[str, torch.Tensor]]


class KVRunner:
    """Runs the plans of one KV node on its module and cache (`seqs` shared with the
    engine; `scheduler` told which tasks finished or failed)."""

    def __init__(self, node: str, module: torch.nn.Module, spec: KVSpec, cache: KVCacheManager,
                 seqs: dict[SeqKey, SeqState], scheduler: KVScheduler, *,
                 device: torch.device, max_seq_len: int, eos_token_ids: tuple[int, ...],
                 grammar: GrammarStates, invocations: collections.Counter[tuple[str, str]],
                 timing: dict[str, float], log_size: int,
                 backend: Callable[[list[SeqChunk], KVCacheManager], AttentionBackend]
                 = torch_attention):
        self.node = node
        self.module = module
        self.spec = spec
        self.cache = cache
        self.seqs = seqs
        self.scheduler = scheduler
        self.device = device
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids
        self.grammar = grammar
        self.invocations = invocations
        self.timing = timing
        #: The attention backend of one step, from its chunks and the cache.
        self.backend = backend
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=log_size)
        #: Tensor-parallel leader: sends every step to the followers (set by the worker).
        self.mirror: Callable[[Any], None] | None = None
        #: A tensor-parallel node's torch.distributed group (set through the engine).
        self.tp_group: Any = None
        #: Emit an NVTX range around each forward (CUDA only; `--enable-nvtx`).
        self.nvtx = False
        self._extras = {e.name: e for e in spec.extras}
        #: Per extra: one default tensor and its last view (see `_absent_extra`).
        self._defaults: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._steps = itertools.count()

    # -- extras -----------------------------------------------------------------------------
    def default_extra(self, name: str, rows: int | None) -> torch.Tensor:
        """Extra `name` as if nobody supplied it: `rows` rows, or one per-seq value."""
        ex = self._extras[name]
        shape = ((rows,) if rows is not None else ()) + tuple(ex.shape)
        return torch.full(shape, ex.default, dtype=ex.dtype, device=self.device)

    def _absent_extra(self, name: str, rows: int) -> torch.Tensor:
        """`default_extra(name, rows)` for a batch where nobody supplied it: a view of one
        cached tensor (grown when a batch is larger), not a fresh one each step; the view of
        the last step is reused while the batch size stays (decode steps)."""
        cached = self._defaults.get(name)
        if cached is None or cached[0].shape[0] < rows:
            full = self.default_extra(name, max(rows, 256))
            cached = self._defaults[name] = (full, full[:rows])
        elif cached[1].shape[0] != rows:
            cached = self._defaults[name] = (cached[0], cached[0][:rows])
        return cached[1]

    def batch_extras(self, pieces: list[Chunk]) -> dict[str, torch.Tensor]:
        """The node's extras for a batch of `pieces` (defaults where absent)."""
        extras: dict[str, torch.Tensor] = {}
        total = sum(p.length for p in pieces)
        supplied = set().union(*(p.token_extras for p in pieces),
                               *(p.seq_extras for p in pieces))  # one pass over the batch
        for name, ex in self._extras.items():
            if name not in supplied:
                extras[name] = self._absent_extra(name, total if ex.per == "token"
                                                  else len(pieces))
            elif ex.per == "token":
                extras[name] = torch.cat([p.token_extras[name] if name in p.token_extras
                                          else self.default_extra(name, p.length)
                                          for p in pieces])
            else:
                extras[name] = torch.stack([p.seq_extras[name] if name in p.seq_extras
                                            else self.default_extra(name, None) for p in pieces])
        return extras

    # -- one step ---------------------------------------------------------------------------
    def run(self, plan: StepPlan) -> list[WorkResult]:
        """Forward the plan's entries (isolating a failing invocation) and commit them."""
        batch = list(plan.entries)
        if not batch:
            return []
        results: list[WorkResult] = []
        try:
            ran = [(batch, self._forward(batch))]
        except Exception as exc:  # isolate the failing invocation; the others go on
            if len(batch) == 1:
                return self.scheduler.fail(batch[0].task, exc)
            ran = []
            for entry in batch:
                try:
                    ran.append(([entry], self._forward([entry])))
                except Exception as single_exc:
                    results.extend(self.scheduler.fail(entry.task, single_exc))
        for part, forward in ran:  # nothing was committed before every forward ran
            results.extend(self._commit(part, *forward))
        return results

    def _forward(self, batch: list[PlanEntry]) -> _Forward:
        """Run the node on `batch`; changes no state (a failure is the batch's input)."""
        seq_chunks: list[SeqChunk] = []
        pieces: list[Chunk] = []
        start = 0
        for entry in batch:
            task, a, b = entry.task, entry.start, entry.end
            piece = entry.piece
            pieces.append(piece)
            outputs: dict[str, tuple[int, int]] = {}
            for name, at in task.wanted.items():
                if at == "last":
                    lo, hi = (task.n - 1, task.n)
                elif at == "all":
                    lo, hi = (0, task.n)
                else:
                    lo, hi = segment_range(task.chunk.segments, int(at.split(":", 1)[1]))
                lo, hi = max(lo, a), min(hi, b)
                if lo < hi:
                    outputs[name] = (lo - a, hi - lo)
            seq_chunks.append(SeqChunk(key=task.key, start=start, length=entry.take,
                                       context_len=self.cache.length(task.key),
                                       segments=piece.segments, mode=task.mode,
                                       is_last_chunk=entry.is_last, outputs=outputs))
            start += entry.take
        works = [e.task.work for e in batch]
        extras = self.batch_extras(pieces)
        fb = ForwardBatch(input_ids=torch.cat([p.input_ids for p in pieces]),
                          positions=torch.cat([p.positions for p in pieces], dim=1),
                          seqs=seq_chunks, extras=extras,
                          ctx=KeyedStepContext(works, self.device, self.tp_group))
        if self.spec.position_axes == 1:
            fb.positions = fb.positions[0]
        if self.mirror is not None:
            self.mirror(tp_step(self.node, fb, batch, self.cache))
        attention = self.backend(seq_chunks, self.cache)
        started = time.perf_counter()
        with torch.inference_mode(), step_range(f"{self.node} step", self.nvtx), \
                attention_context(attention):
            out = self.module(fb)
        seconds = time.perf_counter() - started
        self.timing["forward"] += seconds
        self._log(batch, seq_chunks, seconds)
        return seq_chunks, pieces, fb, out

    def replay(self, step: msg.TPStep) -> int:
        """A tensor-parallel follower: the leader's batch (`tp_step`) on this shard, under
        the same backend, with the leader's adoptions of cached pages, page reservations
        (the very pages), commits and prefix-cache registrations. Returns the tokens the
        adoptions reused."""
        chunks, works, start, reused = [], [], 0, 0
        for s in step.seqs:
            key = SeqKey(s.request_id, self.node, s.label, s.child)
            if not self.cache.has(key):
                self.cache.create(key)
            detached = None
            if s.adopted and self.cache.length(key) != s.context_len:  # not yet (a retry)
                before = self.cache.length(key)
                detached = self.cache.adopt(key, s.adopted)
                reused += self.cache.length(key) - before
            if s.mode == "append":
                self.cache.reserve_as(key, s.pages)
            if detached is not None:
                self.cache.pool.decref(detached)
            chunks.append(SeqChunk(key=key, start=start, length=s.take,
                                   context_len=s.context_len,
                                   segments=[Segment(n, kind) for n, kind in s.segments],
                                   mode=s.mode, is_last_chunk=s.is_last,
                                   outputs={k: tuple(v) for k, v in s.outputs.items()}))
            works.append(NodeWork(s.request_id, s.child, GraphNode(self.node), {}, s.seed,
                                  SamplingParams(), iteration=s.iteration, outer=s.outer,
                                  join_round=s.join_round))
            start += s.take
        fb = ForwardBatch(input_ids=step.input_ids.to_tensor().to(self.device),
                          positions=step.positions.to_tensor().to(self.device), seqs=chunks,
                          extras={k: v.to_tensor().to(self.device)
                                  for k, v in step.extras.items()},
                          ctx=KeyedStepContext(works, self.device, self.tp_group))
        with torch.inference_mode(), attention_context(self.backend(chunks, self.cache)):
            self.module(fb)
        for c, s in zip(chunks, step.seqs):
            if c.mode == "append":
                self.cache.commit(c.key, c.length)
                if s.hashes:
                    self.cache.register(c.key, s.hashes, s.register_from)
            if s.ends is not None:
                self.invocations[s.ends] += 1
        return reused

    def _commit(self, batch: list[PlanEntry], seq_chunks: list[SeqChunk],
                pieces: list[Chunk], fb: ForwardBatch,
                out: dict[str, torch.Tensor]) -> list[WorkResult]:
        """The forward's K/V into the sequences, its outputs to their tasks; finished
        invocations' results."""
        finished: list[Task] = []
        ids = fb.input_ids.tolist()
        positions = fb.positions.tolist()  # every axis: one call, not two
        if fb.positions.dim() == 2:
            positions = positions[0]
        for i, entry in enumerate(batch):
            task, take = entry.task, entry.take
            if task.mode == "append":
                self.cache.commit(task.key, take)
                if task.work is not None:
                    rows = slice(seq_chunks[i].start, seq_chunks[i].start + take)
                    record(self.seqs[task.key], pieces[i], ids[rows], max(positions[rows]))
                if task.hashes:
                    task.registered = self.cache.register(task.key, task.hashes,
                                                          task.registered)
            task.done += take
            if task.done == task.n:
                finished.append(task)
        last_logits: dict[Task, int] = {}  # row of `out["logits"]` with a task's last logits
        for name, value in out.items():
            holders = fb.output_seqs(name)
            counts = [seq_chunks[i].outputs[name][1] for i in holders]
            for i, part in zip(holders, torch.split(value, counts)):
                batch[i].task.pieces.setdefault(name, []).append(part)
            if name == "logits":
                last_logits = {batch[i].task: end - 1
                               for i, end in zip(holders, itertools.accumulate(counts))}
        return self._finish(finished, out.get("logits"), last_logits)

    def _finish(self, finished: list[Task], logits: torch.Tensor | None,
                last_logits: dict[Task, int]) -> list[WorkResult]:
        """Results of the `finished` tasks, sampling those that sample from their last
        logits: rows of this step's `logits` (`last_logits`) where they are there."""
        results: list[WorkResult] = []
        to_sample: list[Task] = []
        self.scheduler.retire(finished)
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
            def last(tasks: list[Task]) -> torch.Tensor:
                return self._last_logits(tasks, logits, last_logits)
            try:
                results.extend(self._sample(to_sample, last(to_sample)))
            except Exception:  # a request's logits processor raised: it fails alone
                for task in to_sample:
                    try:
                        results.extend(self._sample([task], last([task])))
                    except Exception as exc:
                        results.append(WorkResult(task.work, error=exc))
        return results

    @staticmethod
    def _outputs(task: Task) -> dict[str, Any]:
        """The task's outputs; one produced in a single step is that step's rows (a view of
        the batch output, as `token_ids` is), not a copy: a decode step makes one per
        sequence, and every torch call there costs a GIL hand-off (see `kv_engine`)."""
        return {name: parts[0] if len(parts) == 1 else torch.cat(parts)
                for name, parts in task.pieces.items() if name in task.work.node.outputs}

    @staticmethod
    def _last_logits(tasks: list[Task], logits: torch.Tensor | None,
                     rows: dict[Task, int]) -> torch.Tensor:
        """[len(tasks), V]: each task's last logits row. Taken from the step's `logits` at
        `rows` (the step's tensor itself when the tasks are all its rows, in order: a decode
        step copies no logits); from the tasks' pieces when some came from an earlier step."""
        at = [rows.get(t, -1) for t in tasks]
        if logits is not None and -1 not in at:
            return logits if at == list(range(logits.shape[0])) else logits[at]
        last = [t.pieces["logits"][-1] for t in tasks]
        return torch.cat([p if p.shape[0] == 1 else p[-1:] for p in last])

    def _sample(self, tasks: list[Task], logits: torch.Tensor) -> list[WorkResult]:
        states = [self.seqs[t.key] for t in tasks]
        positions = [self.cache.length(t.key) for t in tasks]  # of the sampled tokens
        rows = [SampleRequest(params=t.work.sampling, seed=t.work.seed, child=t.work.child,
                              site=t.work.node.name, step=position,
                              history=SampledIds(state.sampled),
                              prompt_ids=state.appended_ids, key=t.key)
                for t, state, position in zip(tasks, states, positions)]
        result = sample(logits, rows, self.grammar)
        tokens = result.token_ids.tolist()
        token_rows = _on_host(result.token_ids).split(1)  # each row's `token_ids`, one op
        results = []
        for i, (t, state, position) in enumerate(zip(tasks, states, positions)):
            if i in result.failed:
                results.append(WorkResult(t.work, error=RequestError(
                    result.failed[i], param="response_format")))
                continue
            token = tokens[i]
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

    def _log(self, batch: list[PlanEntry], chunks: list[SeqChunk], seconds: float) -> None:
        entries = []
        for entry, chunk in zip(batch, chunks):
            task, w = entry.task, entry.task.work
            entries.append({
                "request_id": task.request_id, "label": task.key.label, "child": task.key.child,
                "walk": w.walk if w else "recompute", "node": w.node.name if w else self.node,
                "iteration": w.iteration if w else None, "tokens": entry.take, "mode": task.mode,
                "context": chunk.context_len,  # cached tokens it attended to
            })
        self.step_log.append(StepRecord(next(self._steps), entries, seconds))
