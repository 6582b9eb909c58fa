"""The stateless engine: batched calls of encoders, decoders, codecs and small combine steps.

A stateless node's module takes a list of per-invocation input dicts and a step context and
returns a list of output dicts (`forward(items, ctx)`), batching inside as its shapes allow
(ragged through the cache-less attention, or padded). Every queued invocation joins the next
call, up to `max_batch`.
"""

from __future__ import annotations

import collections
import itertools
import time

import torch

from mstar.engine.kv_engine import StepRecord
from mstar.engine.profiling import step_range
from mstar.engine.work import KeyedStepContext, NodeWork, WorkResult


class StatelessEngine:
    def __init__(self, node: str, module: torch.nn.Module, *, max_batch: int = 64,
                 log_size: int = 10_000):
        self.node = node
        self.module = module
        self.max_batch = max_batch
        self.waiting: list[NodeWork] = []
        self.nvtx = False  # NVTX range around each call (CUDA only; `--enable-nvtx`)
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=log_size)
        self._steps = itertools.count()

    def has_work(self) -> bool:
        return bool(self.waiting)

    def submit(self, work: NodeWork) -> None:
        self.waiting.append(work)

    def release(self, request_id: str) -> None:
        self.waiting = [w for w in self.waiting if w.request_id != request_id]

    def step(self) -> list[WorkResult]:
        works, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
        if not works:
            return []
        try:
            return self._run(works)
        except Exception as exc:  # isolate the failing invocation; the others go on
            if len(works) == 1:
                return [WorkResult(works[0], error=exc)]
        results: list[WorkResult] = []
        for w in works:
            try:
                results.extend(self._run([w]))
            except Exception as exc:
                results.append(WorkResult(w, error=exc))
        return results

    def _run(self, works: list[NodeWork]) -> list[WorkResult]:
        items = [dict(w.inputs) for w in works]
        started = time.perf_counter()
        with torch.inference_mode(), step_range(f"{self.node} step", self.nvtx):
            outs = self.module(items, KeyedStepContext(works))
        seconds = time.perf_counter() - started
        if len(outs) != len(works):
            raise RuntimeError(f"{self.node} returned {len(outs)} results for {len(works)} items")
        self.step_log.append(StepRecord(next(self._steps), [
            {"request_id": w.request_id, "walk": w.walk, "node": w.node.name, "child": w.child,
             "iteration": w.iteration} for w in works], seconds))
        return [WorkResult(w, dict(o)) for w, o in zip(works, outs)]
