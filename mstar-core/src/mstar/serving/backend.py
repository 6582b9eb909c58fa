"""The HTTP app's `Backend` over a process-based deployment: requests go through the
gateway to the data workers (so `submit` never runs model code here), readiness and gauges
come from the reports the gateway collects, liveness from the launcher, which watches the
child processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mstar.api_server.backend import ModelInfo, Sink, Stats, frontend_stats

if TYPE_CHECKING:
    from mstar.serving.launcher import ProcessDeployment


class GatewayBackend:
    def __init__(self, deployment: ProcessDeployment):
        self.deployment = deployment
        self.gateway = deployment.gateway

    def model_info(self) -> ModelInfo:
        spec, config = self.deployment.spec, self.deployment.config
        return ModelInfo(name=spec.name, capabilities=list(spec.capabilities),
                         max_model_len=config.max_seq_len,
                         max_concurrent_requests=config.max_concurrent_requests)

    def submit(self, body: Mapping[str, Any], sink: Sink, request_id: str) -> str:
        return self.gateway.submit(body, sink, request_id)

    def cancel(self, request_id: str) -> None:
        self.gateway.cancel(request_id)

    def ready(self) -> bool:
        return self.gateway.ready.is_set() and self.failed() is None

    def failed(self) -> str | None:
        errors = self.gateway.startup_errors
        if errors:
            return "; ".join(f"{address} failed to start: {error}"
                             for address, error in sorted(errors.items()))
        return self.deployment.failure

    def live_requests(self) -> int:
        return self.gateway.live_requests()

    def stats(self) -> Stats:
        # the gateway holds the same reports a frontend would (`worker_stats`, live count)
        return frontend_stats(self.gateway)  # type: ignore[arg-type]


__all__ = ["GatewayBackend"]
