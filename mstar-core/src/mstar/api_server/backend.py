"""What the HTTP app needs from a deployment: the `Backend` protocol.

The app talks only to a `Backend`, so the same routes serve an in-process `LocalDeployment`
(tests, notebooks) and the process-based deployment of `mstar serve`; both adapters live in
`mstar.serving.backends`. Everything but `submit` and `stats` is called on the event loop,
so those methods must be cheap and never block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

from mstar.events import Sink

if TYPE_CHECKING:
    from mstar.media import MediaLimits



class ModelInfo(TypedDict):
    """What `/v1/models` shows, what admission needs, the import string of the pydantic
    model of `/generate`'s body (`ModelSpec.request_schema`, None when undeclared), and the
    model's config as plain values (`config`: what a plugin's routes may announce, e.g. a
    policy's action horizon)."""

    name: str
    capabilities: list[str]
    max_model_len: int
    max_concurrent_requests: int
    request_schema: str | None
    config: NotRequired[dict[str, Any]]


class Stats(TypedDict):
    """The gauges `/metrics` reads at scrape time.

    `queue_depth`: node invocations waiting for an engine step, summed over the ranks (an
    admitted request always runs, so this is where work queues up); `running`: requests in
    flight; `step_seconds`: mean forward seconds per engine step of each (rank, node) over
    the workers' last report interval (absent while a node is idle); `counters`: the
    engines' cumulative counts by (rank, "<node>.<name>") (`LLM.prefix_cache_hit_tokens`);
    `invocations`: node invocations run, by (rank, graph node, walk); `parameter_bytes`:
    by (rank, node) held, (all its parameter bytes, those split by tensor parallelism);
    `reported_at`: by rank, the wall-clock time its latest report was read;
    `rank_pages_in_use`: by rank, the KV pages its engines hold (last report);
    `node_pages_in_use`: by (rank, KV node), the pages of that node's own pool.
    """

    pages_in_use: int
    queue_depth: int
    running: int
    step_seconds: dict[tuple[int, str], float]
    counters: dict[tuple[int, str], int]
    invocations: dict[tuple[int, str, str], int]
    parameter_bytes: dict[tuple[int, str], tuple[int, int]]
    reported_at: dict[int, float]
    rank_pages_in_use: dict[int, int]
    node_pages_in_use: dict[tuple[int, str], int]


class Backend(Protocol):
    def model_info(self) -> ModelInfo:
        """The served model (constant for the backend's life)."""

    def submit(self, body: Mapping[str, Any], sink: Sink, request_id: str, *,
               kind: str = "generate", blobs: Sequence[bytes] = ()) -> str:
        """Start a request (`kind` "generate", "completion", "chat", whose media parts
        index `blobs`, or "transcription" of the audio file `blobs[0]`); `sink` receives its events from another thread, the last one
        `Finished` or `Error`. Bad input raises `mstar.errors.RequestError` (with
        `.code`, `.param`) where the model's `process_prompt` runs in this process, or
        arrives as a first `Error` event (code 400) where it runs in a data worker."""

    def cancel(self, request_id: str) -> None:
        """End a request early (its sink then gets a final event); unknown ids are ignored."""

    def ready(self) -> bool:
        """Every worker is up (weights loaded, warmed up) and none has failed."""

    def failed(self) -> str | None:
        """Why the deployment cannot serve (a worker failed to start or died), else None."""

    def degraded(self) -> str | None:
        """What is down while the deployment still serves (a data-parallel replica whose
        worker died), else None."""

    def live_requests(self) -> int:
        """Requests submitted and not yet finished (admission compares it to the limit)."""

    def is_live(self, request_id: str) -> bool:
        """Whether the request was submitted and has not finished yet."""

    def stats(self) -> Stats:
        """Current gauges (may block briefly: called off the event loop)."""

    def use_media_limits(self, limits: MediaLimits) -> None:
        """Where chat media are decoded, decode them within `limits` (the server's)."""


__all__ = ["Backend", "ModelInfo", "Stats"]
