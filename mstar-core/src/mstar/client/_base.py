"""What the sync and async clients share besides the protocol: their settings, the httpx
client they open, the cached default model and the retry log line."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import httpx

from mstar.client import _protocol as protocol
from mstar.client.errors import MStarError
from mstar.client.results import ModelInfo

log = logging.getLogger("mstar.client")


class ClientBase:
    """Settings of a client. `api_key` defaults to the `MSTAR_API_KEY` environment
    variable; `timeout` (seconds, None for none) bounds each wait on the server (connect,
    each read), not a whole stream; `max_retries` and `backoff` shape the retries of
    refused connections, 429 and 503; `model` is the default for routes that name one
    (else the first model `GET /v1/models` lists, asked once)."""

    _HTTP: ClassVar[type[httpx.Client] | type[httpx.AsyncClient]]

    def __init__(self, base_url: str = "http://localhost:8000", *, api_key: str | None = None,
                 timeout: float | None = 600.0, max_retries: int = 2, backoff: float = 0.5,
                 model: str | None = None):
        self.base_url = base_url.rstrip("/")
        self._retry = protocol.RetryPolicy(max_retries=max_retries, backoff=backoff)
        self._model = model
        self._listed: list[ModelInfo] | None = None  # `GET /v1/models`, asked once
        self._http: Any = self._HTTP(base_url=self.base_url, timeout=httpx.Timeout(timeout),
                                     headers=protocol.headers(api_key))

    def _remember_model(self, listed: list[ModelInfo]) -> str:
        if not listed:
            raise MStarError(f"{self.base_url} lists no models; pass model=...")
        self._model = listed[0].id
        return self._model

    def _log_retry(self, route: protocol.Route, attempt: int, delay: float,
                   reason: str) -> None:
        log.info("%s %s%s: %s; retry %d of %d in %.2f s", route.method, self.base_url,
                 route.path, reason, attempt + 1, self._retry.max_retries, delay)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"
