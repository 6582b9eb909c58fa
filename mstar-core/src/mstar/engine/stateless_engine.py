"""The stateless engine: batched calls of encoders, decoders, codecs and small combine steps.

A stateless node's module takes a list of per-invocation input dicts and a step context and
returns a list of output dicts (`forward(items, ctx)`), batching inside as its shapes allow
(ragged through the cache-less attention, or padded). Every queued invocation joins the next
call, up to `max_batch`.

A node the model declares cacheable (`Model.cacheable_nodes`: its outputs are a pure
function of its inputs) gets an encoder-output cache: each invocation is keyed by a hash of
its inputs, repeats (the same image in another request, or twice in one batch) are served
without running the module, and the outputs stay in an LRU bounded in bytes.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import itertools
import time
from typing import Any

import torch

from mstar.engine.kv_engine import StepRecord
from mstar.engine.profiling import step_range
from mstar.engine.work import CPU, KeyedStepContext, NodeWork, WorkResult


def input_key(inputs: dict[str, Any]) -> bytes:
    """A hash of an invocation's inputs: each tensor's dtype, shape and bytes, and every
    host value, by name."""
    h = hashlib.blake2b(digest_size=16)

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"D%d" % len(value))
            for k in sorted(value, key=repr):
                h.update(repr(k).encode())
                feed(value[k])
        elif isinstance(value, list | tuple):
            h.update(b"L%d" % len(value))
            for v in value:
                feed(v)
        else:
            h.update(f"V{type(value).__name__}:{value!r}".encode())

    feed(inputs)
    return h.digest()


def _copy(outputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs a caller may keep or change without touching the cached ones."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in outputs.items()}


class OutputCache:
    """Outputs by input key, least recently used evicted first, at most `max_bytes` of
    tensors (an entry larger than that is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[bytes, tuple[dict[str, Any], int]] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return _copy(entry[0])

    def put(self, key: bytes, outputs: dict[str, Any]) -> None:
        size = sum(v.numel() * v.element_size() for v in outputs.values()
                   if isinstance(v, torch.Tensor))
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (_copy(outputs), size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


class StatelessEngine:
    def __init__(self, node: str, module: torch.nn.Module, *, max_batch: int = 64,
                 log_size: int = 10_000, cache_bytes: int = 0,
                 device: torch.device = CPU):
        """`cache_bytes` > 0 gives the node an encoder-output cache of that size (only for
        nodes whose outputs are a pure function of their inputs); `device`: the rank's, where
        `ctx.randn` puts a parameterless node's noise."""
        self.node = node
        self.module = module
        self.device = device
        self.max_batch = max_batch
        self.waiting: list[NodeWork] = []
        self.nvtx = False  # NVTX range around each call (CUDA only; `--enable-nvtx`)
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=log_size)
        self._steps = itertools.count()
        self.cache = OutputCache(cache_bytes) if cache_bytes > 0 else None
        #: Cumulative: invocations the module ran, by (graph node, walk), and, with a
        #: cache, those the cache served instead.
        self.invocations: collections.Counter[tuple[str, str]] = collections.Counter()
        self.counters: dict[str, int] = {}
        if self.cache is not None:
            self.counters["encoder_cache_hits"] = 0

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
        outs: list[dict[str, Any] | None] = [None] * len(works)
        keys: list[bytes | None] = [None] * len(works)
        first_of: dict[bytes, int] = {}  # key -> the item of this batch that computes it
        run: list[int] = []
        for i, w in enumerate(works):
            if self.cache is not None:
                keys[i] = key = input_key(w.inputs)
                outs[i] = self.cache.get(key)
                if outs[i] is not None or key in first_of:
                    continue
                first_of[key] = i
            run.append(i)
        if run:
            computed = self._call([works[i] for i in run])
            for i, o in zip(run, computed):
                outs[i] = o
                if keys[i] is not None:
                    self.cache.put(keys[i], o)
        for i, key in enumerate(keys):
            if outs[i] is None:  # a repeat within this batch
                outs[i] = _copy(outs[first_of[key]])
        self.invocations.update((works[i].node.name, works[i].walk) for i in run)
        if self.cache is not None:
            self.counters["encoder_cache_hits"] += len(works) - len(run)
        return [WorkResult(w, o) for w, o in zip(works, outs)]

    def _call(self, works: list[NodeWork]) -> list[dict[str, Any]]:
        """Run the module on `works` (one batch), logging the step."""
        items = [dict(w.inputs) for w in works]
        started = time.perf_counter()
        with torch.inference_mode(), step_range(f"{self.node} step", self.nvtx):
            outs = self.module(items, KeyedStepContext(works, self.device))
        seconds = time.perf_counter() - started
        if len(outs) != len(works):
            raise RuntimeError(f"{self.node} returned {len(outs)} results for {len(works)} items")
        self.step_log.append(StepRecord(next(self._steps), [
            {"request_id": w.request_id, "walk": w.walk, "node": w.node.name, "child": w.child,
             "iteration": w.iteration} for w in works], seconds))
        return [dict(o) for o in outs]
