"""Prometheus metrics of one HTTP app.

Request outcomes and latencies are observed where events leave the server (so they measure
what clients see); gauges are read from the backend at scrape time. Each app has its own
registry, not prometheus-client's global one, so several apps in one process (tests, a
second app with an API key) keep separate counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mstar import events
from mstar.api_server.backend import Stats

#: Final statuses of a request: finished normally; failed (bad input, model or worker
#: error); cancelled (the client left); timed out; refused at admission (busy, not ready).
STATUSES = ("ok", "error", "abort", "timeout", "rejected")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_OUTPUTS = (events.TextDelta, events.AudioChunk, events.Image, events.NamedTensor)
_STREAMED = (events.TextDelta, events.AudioChunk)
#: The engines' counters `/metrics` shows: (metric name, counter name, help), each by node
#: and rank.
ENGINE_COUNTERS = (
    ("mstar_prefix_cache_hit_tokens", "prefix_cache_hit_tokens",
     "Prompt tokens whose K/V came from the prefix cache instead of being computed."),
    ("mstar_prompt_tokens_computed", "prompt_tokens_computed",
     "Prompt tokens a KV-cache node actually ran (rebuilds after preemption included)."),
    ("mstar_preemptions", "preemptions",
     "Requests whose KV pages a node dropped under memory pressure (rebuilt by recompute)."),
    ("mstar_kv_tokens_imported", "kv_tokens_imported",
     "Tokens whose K/V a KV-cache node received from another rank instead of computing "
     "them (a migrated request, a CFG branch's forked prefix)."),
    ("mstar_encoder_cache_hits", "encoder_cache_hits",
     "Invocations of a cacheable node served from its encoder-output cache."),
    ("mstar_batched_prompts", "batched_prompts",
     "Prompts (a sequence's first chunk) a KV-cache node ran in one step with other "
     "sequences: requests sharing a batched prefill."),
    ("mstar_batched_scratch_chunks", "batched_scratch_chunks",
     "Scratch chunks (a denoising step's block) a KV-cache node ran in one step with other "
     "sequences: requests sharing a batched denoising step."),
)


def status_of(event: events.Finished | events.Error) -> str:
    """The metrics status of a request's final event."""
    if isinstance(event, events.Error):
        return {429: "rejected", 504: "timeout"}.get(event.code, "error")
    return {"abort": "abort", "timeout": "timeout", "error": "error"}.get(event.reason, "ok")


class _BackendGauges:
    """A collector that reads the backend's gauges on each scrape. A node's step time keeps
    its last value while the node idles (the workers only report nodes that stepped)."""

    def __init__(self, stats: Callable[[], Stats]):
        self._stats = stats
        self._steps: dict[tuple[int, str], float] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("mstar_queue_depth", "Node invocations waiting for an "
                                "engine step (all ranks).", value=stats["queue_depth"])
        yield GaugeMetricFamily("mstar_running_requests", "Requests in flight.",
                                value=stats["running"])
        yield GaugeMetricFamily("mstar_kv_pages_in_use", "KV cache pages held (all ranks).",
                                value=stats["pages_in_use"])
        by_rank = GaugeMetricFamily("mstar_rank_kv_pages_in_use", "KV cache pages a rank's "
                                    "engines hold (its latest report).", labels=["rank"])
        for rank, pages in sorted(stats["rank_pages_in_use"].items()):
            by_rank.add_metric([str(rank)], pages)
        yield by_rank
        by_node = GaugeMetricFamily("mstar_node_kv_pages_in_use", "KV cache pages a KV "
                                    "node holds of its own pool on a rank (its latest "
                                    "report).", labels=["node", "rank"])
        for (rank, node), pages in sorted(stats["node_pages_in_use"].items()):
            by_node.add_metric([node, str(rank)], pages)
        yield by_node
        steps = GaugeMetricFamily("mstar_step_seconds", "Mean forward seconds per engine "
                                  "step of a node on a rank (last report).",
                                  labels=["rank", "node"])
        with self._lock:
            self._steps.update(stats["step_seconds"])
            for (rank, node), seconds in sorted(self._steps.items()):
                steps.add_metric([str(rank), node], seconds)
        yield steps
        for metric, counter, doc in ENGINE_COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["node", "rank"])
            for (rank, key), value in sorted(stats["counters"].items()):
                node, _, name = key.rpartition(".")
                if name == counter:
                    family.add_metric([node, str(rank)], value)
            yield family
        invocations = CounterMetricFamily(
            "mstar_node_invocations", "Invocations of a node a rank ran, by walk (a branch "
            "node by its own name; a tensor-parallel node on every rank of its group; an "
            "encoder-cache hit is not run).", labels=["node", "rank", "walk"])
        for (rank, node, walk), count in sorted(stats["invocations"].items()):
            invocations.add_metric([node, str(rank), walk], count)
        yield invocations
        held = GaugeMetricFamily("mstar_node_parameters_bytes", "Bytes of a node's "
                                 "parameters a rank holds.", labels=["node", "rank"])
        split = GaugeMetricFamily(
            "mstar_node_sharded_parameters_bytes", "Of those, the bytes of the parameters "
            "tensor parallelism splits (a rank of a tp_size t group holds 1/t of them).",
            labels=["node", "rank"])
        for (rank, node), (total, sharded) in sorted(stats["parameter_bytes"].items()):
            held.add_metric([node, str(rank)], total)
            split.add_metric([node, str(rank)], sharded)
        yield held
        yield split
        reported = GaugeMetricFamily(
            "mstar_worker_report_timestamp_seconds", "When the counters above were last "
            "read on a rank (its latest report), in seconds since the epoch.",
            labels=["rank"])
        for rank, at in sorted(stats["reported_at"].items()):
            reported.add_metric([str(rank)], at)
        yield reported


class Metrics:
    """The app's registry and metric objects; `request()` gives one request's recorder."""

    def __init__(self, stats: Callable[[], Stats]):
        self.registry = CollectorRegistry()
        self.requests = Counter("mstar_requests", "Requests by final status.", ["status"],
                                registry=self.registry)
        for status in STATUSES:
            self.requests.labels(status)
        self.first_output = Histogram(
            "mstar_time_to_first_output_seconds", "From a request's arrival to its first "
            "output event.", buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram(
            "mstar_inter_token_latency_seconds", "Gaps between successive text or audio "
            "events of a request.", buckets=_GAP_BUCKETS, registry=self.registry)
        self.output_tokens = Counter("mstar_output_tokens", "Tokens generated by finished "
                                     "requests (their usage).", registry=self.registry)
        self.registry.register(_BackendGauges(stats))

    def request(self) -> RequestMetrics:
        return RequestMetrics(self)

    def render(self) -> bytes:
        """The Prometheus text exposition (reads the backend: call it off the event loop)."""
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's clock: feed it every event the client gets and its final status; it is
    counted once, by `count`, when the response's status is known (so a request the route
    ends with a 5xx is an error even after a `Finished` event)."""

    def __init__(self, metrics: Metrics):
        self._m = metrics
        self._start = time.perf_counter()
        self._first_seen = False
        self._first_at: float | None = None
        self._finished_at: float | None = None
        self._last_streamed: float | None = None
        self._counted = False
        self.status: str | None = None

    def event(self, event: events.Event) -> None:
        now = time.perf_counter()
        if isinstance(event, _OUTPUTS) and not self._first_seen:
            self._first_seen, self._first_at = True, now
            self._m.first_output.observe(now - self._start)
        if isinstance(event, _STREAMED):
            if self._last_streamed is not None:
                self._m.inter_token.observe(now - self._last_streamed)
            self._last_streamed = now
        if isinstance(event, events.Finished):
            self._finished_at = now
            self._m.output_tokens.inc(event.usage.completion_tokens)

    def timing(self) -> dict[str, float]:
        """What the client's answer tells of this clock, in ms since the route received
        the request: `total_ms` (to the finish, or now) and `first_output_ms` (the first
        text, audio, image or tensor) when there was one."""
        end = self._finished_at if self._finished_at is not None else time.perf_counter()
        out = {"total_ms": round((end - self._start) * 1000, 3)}
        if self._first_at is not None:
            out["first_output_ms"] = round((self._first_at - self._start) * 1000, 3)
        return out

    def finish(self, status: str) -> None:
        """Record the request's final status (the first one given wins)."""
        if self.status is None:
            self.status = status

    def count(self, http_status: int) -> None:
        """Count the request once, under its final status: an error answer (4xx, 5xx)
        is never "ok" whatever the events said; a request that recorded none takes the
        HTTP status's (499: the client left; 429 and 503: rejected; 504: timeout)."""
        if self._counted:
            return
        self._counted = True
        status = self.status
        if status is None:
            status = ("ok" if http_status < 400 else "abort" if http_status == 499 else
                      "rejected" if http_status in (429, 503) else
                      "timeout" if http_status == 504 else "error")
        if http_status >= 400 and status == "ok":
            status = "error"
        self._m.requests.labels(status).inc()


__all__ = ["STATUSES", "Metrics", "RequestMetrics", "status_of"]
