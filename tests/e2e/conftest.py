"""Fixtures for in-process end-to-end tests: a tiny testvla checkpoint on disk and helpers
that run requests through `mstar.load` deployments."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from mstar import events


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mstar_testvla.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("testvla-tiny"), preset="tiny")


def collect(deployment, request: dict) -> list[events.Event]:
    return list(deployment.generate(request))


def tokens(evs: list[events.Event], index: int = 0) -> list[int]:
    return [t for e in evs if isinstance(e, events.TextDelta) and e.index == index
            for t in e.token_ids]


def tensors(evs: list[events.Event], name: str) -> list[torch.Tensor]:
    return [e.tensor.to_tensor() for e in evs if isinstance(e, events.NamedTensor)
            and e.name == name]


def audio(evs: list[events.Event]) -> torch.Tensor:
    parts = [e.samples.to_tensor() for e in evs if isinstance(e, events.AudioChunk)]
    return torch.cat(parts) if parts else torch.empty(0)


def finished(evs: list[events.Event]) -> events.Finished:
    assert isinstance(evs[-1], events.Finished), evs[-1]
    return evs[-1]


def run_concurrently(deployment, requests: list[dict]) -> list[list[events.Event]]:
    """Run requests from parallel client threads; results in request order."""
    results: list[list[events.Event] | None] = [None] * len(requests)

    def one(i: int) -> None:
        results[i] = collect(deployment, requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a request did not finish"
    return results  # type: ignore[return-value]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


@contextlib.contextmanager
def serving(app) -> Iterator[httpx.Client]:
    """Serve `app` from a background thread; a client bound to it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive())
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def settle(deployment) -> None:
    """Wait until every request is released: pages and tensors back to zero."""
    wait_for(lambda: deployment.pages_in_use() == 0 and deployment.live_tensors() == 0
             and deployment.frontend.live_requests() == 0)


def image(seed: int, h: int = 8, w: int = 8) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g).tolist()


def frame(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, generator=g).tolist()


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in a Prometheus text exposition whose labels
    include `labels` (0 when there are none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())
