"""`mstar.load`: a whole deployment in one process.

The same conductor, workers and frontend the server runs as processes, here as threads
that talk only through an in-process hub (encoded messages) and move tensors only through a
local transport, so tests, notebooks and benchmarks exercise the real runtime.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Mapping
from typing import Any

from mstar import events
from mstar.communication.channel import InProcessHub
from mstar.communication.transport import LocalStore, LocalTransport
from mstar.config import DeploymentConfig, load_config, with_preset_cap
from mstar.config.settings import parse_revisions
from mstar.engine.kv_engine import KVEngine, StepRecord
from mstar.errors import RequestError
from mstar.model.contract import Model
from mstar.plugins import model_registry
from mstar.plugins.registry import ModelSpec
from mstar.runtime.builder import LoadOptions, make_model
from mstar.runtime.frontend import Frontend
from mstar.runtime.wiring import Wiring
from mstar.runtime.worker import Worker

LOAD_FORMATS = ("auto", "dummy")


def deployment_config(spec: ModelSpec, config: Any, overrides: Mapping[str, Any]
                       ) -> DeploymentConfig:
    if config is None:
        data = (load_config(spec.default_config).model_dump() if spec.default_config
                else {"model": spec.name})
    elif isinstance(config, DeploymentConfig):
        data = config.model_dump()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        data = load_config(str(config)).model_dump()
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data.setdefault("model", spec.name)
    return DeploymentConfig.model_validate(data)


class EventStream:
    """The events of one request; `close()` (or dropping it unfinished) cancels it."""

    def __init__(self, frontend: Frontend, request_id: str,
                 sink: queue.SimpleQueue[events.Event]):
        self.request_id = request_id
        self._frontend = frontend
        self._sink = sink
        self._done = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> events.Event:
        if self._done:
            raise StopIteration
        event = self._sink.get()
        self._done = isinstance(event, events.Finished | events.Error)
        return event

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._frontend.cancel(self.request_id)

    def __del__(self) -> None:
        self.close()


class AsyncEventStream:
    def __init__(self, frontend: Frontend, request_id: str, sink: asyncio.Queue[events.Event]):
        self.request_id = request_id
        self._frontend = frontend
        self._sink = sink
        self._done = False

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> events.Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._sink.get()
        self._done = isinstance(event, events.Finished | events.Error)
        return event

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._frontend.cancel(self.request_id)


class LocalDeployment:
    """A running deployment in this process. `generate(request)` yields `mstar.events`."""

    def __init__(self, spec: ModelSpec, model: Model, config: DeploymentConfig,
                 options: LoadOptions, *, device: str | None = None,
                 enable_nvtx: bool = False):
        wiring = Wiring(model, config, options, enable_nvtx=enable_nvtx,
                        request_schema_path=spec.request_schema)
        if device is not None:
            wiring = wiring.on_device(device)
        self.spec, self.model, self.config = spec, model, wiring.config
        self.placement, self.devices = wiring.placement, wiring.devices
        hub, store = InProcessHub(), LocalStore()
        self._store = store
        ranks = self.placement.ranks()
        self.workers: dict[int, Worker] = {
            rank: wiring.worker(rank, hub.channel(f"worker:{rank}"),
                                LocalTransport(f"worker:{rank}", store))
            for rank in ranks}
        self.frontend = wiring.frontend(hub.channel("frontend"),
                                        LocalTransport("frontend", store))
        self.frontend.expected_workers = {f"worker:{r}" for r in ranks}
        self.conductor = wiring.conductor(hub.channel("conductor"))
        self.frontend.start()
        self.conductor.start()
        for worker in self.workers.values():
            worker.start()
        if not self.frontend.ready.wait(timeout=600):
            self.close()
            raise RuntimeError("workers did not report ready within 600 s")
        failed = [w.startup_error for w in self.workers.values() if w.startup_error]
        if failed:
            self.close()
            raise failed[0]

    # -- requests ---------------------------------------------------------------------------
    def generate(self, request: Mapping[str, Any], *, request_id: str | None = None
                 ) -> EventStream:
        """Submit `request` (the JSON body `POST /generate` takes) now and return an
        iterator over its events, ending with `Finished` or `Error`. Bad input raises
        `RequestError` here. Closing the iterator before the end cancels the request."""
        sink: queue.SimpleQueue[events.Event] = queue.SimpleQueue()
        rid = self.frontend.submit(request, sink.put, request_id=request_id)
        return EventStream(self.frontend, rid, sink)

    def agenerate(self, request: Mapping[str, Any], *, request_id: str | None = None
                  ) -> AsyncEventStream:
        """The asyncio form of `generate` (call it inside a running event loop)."""
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue[events.Event] = asyncio.Queue()
        rid = self.frontend.submit(
            request, lambda e: loop.call_soon_threadsafe(sink.put_nowait, e),
            request_id=request_id)
        return AsyncEventStream(self.frontend, rid, sink)

    def cancel(self, request_id: str) -> None:
        self.frontend.cancel(request_id)

    # -- introspection ----------------------------------------------------------------------
    def step_log(self, node: str, rank: int | None = None) -> list[StepRecord]:
        """Engine steps of `node` (on `rank`, or the first rank holding it)."""
        for r, worker in sorted(self.workers.items()):
            if (rank is None or r == rank) and node in worker.engines:
                return list(worker.engines[node].step_log)
        raise KeyError(f"no rank holds node {node!r}")

    def pages_in_use(self) -> int:
        return sum(w.pages_in_use() for w in self.workers.values())

    def counters(self, rank: int | None = None) -> dict[str, int]:
        """The engines' cumulative counters ("<node>.<name>": `LLM.prefix_cache_hit_tokens`,
        `LLM.prompt_tokens_computed`, `LLM.kv_tokens_imported`,
        `vision_encoder.node_invocations`, `vision_encoder.encoder_cache_hits`), of `rank`
        or summed over the ranks, read now (not from the last stats report, which
        `/metrics` shows)."""
        total: dict[str, int] = {}
        for r, worker in self.workers.items():
            if rank is None or r == rank:
                for name, value in worker.counters().items():
                    total[name] = total.get(name, 0) + value
        return total

    def live_tensors(self) -> int:
        return len(self._store.items)

    def kv_engine(self, node: str, rank: int = 0) -> KVEngine:
        engine = self.workers[rank].engines[node]
        assert isinstance(engine, KVEngine)
        return engine

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.conductor.stop()
        self.frontend.stop()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(model: str, config: DeploymentConfig | Mapping[str, Any] | str | None = None, *,
         preset: str | None = None, load_format: str = "auto", model_path: str | None = None,
         cache_dir: str | None = None,
         revision: str | Mapping[str, str] | None = None, seed: int = 0,
         device: str | None = None, enable_nvtx: bool = False,
         **overrides: Any) -> LocalDeployment:
    """Load `model` (a registered name) and start it in this process.

    `config`: a DeploymentConfig, a dict, a YAML path or a packaged config name (default:
    the model's default config, else everything on rank 0). `overrides` replace top-level
    config fields (`max_seq_len=512`, `kv_cache={"num_pages": 64}`, `node_groups=[...]`).
    `load_format="dummy"` with a `preset` runs seeded random weights of the real shapes.
    `revision`: the hub revision of the default weight source, or one per source
    (`{"default": sha, "snac": tag}`, or `"default=sha,snac=tag"` as `--revision` takes).
    Devices as served (`mstar.config.devices`): the config's `devices` mapping, else rank r
    on cuda:r when CUDA is visible, else the CPU; `device="cpu"` puts every rank there.
    `enable_nvtx`: NVTX ranges around engine steps, as `mstar serve --enable-nvtx`.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; allowed: {list(LOAD_FORMATS)}")
    spec = model_registry().get(model)
    deployment = deployment_config(spec, config, overrides)
    options = LoadOptions.of(spec, load_format=load_format, model_path=model_path,
                             cache_dir=cache_dir, revisions=parse_revisions(revision) or {},
                             seed=seed)
    instance = make_model(spec, deployment.model_kwargs, preset=preset, options=options)
    deployment = with_preset_cap(deployment, instance, preset,
                                 explicit="max_seq_len" in overrides)
    return LocalDeployment(spec, instance, deployment, options, device=device,
                           enable_nvtx=enable_nvtx)


__all__ = ["AsyncEventStream", "EventStream", "LocalDeployment", "RequestError", "load"]
