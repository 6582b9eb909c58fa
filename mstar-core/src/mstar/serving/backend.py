"""The HTTP app's `Backend` over a process-based deployment: requests go through the
gateway to the data workers (so `submit` never runs model code here), readiness and gauges
come from the reports the gateway collects, liveness from the launcher, which watches the
child processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mstar.api_server.backend import EntryBackend

if TYPE_CHECKING:
    from mstar.serving.launcher import ProcessDeployment


class GatewayBackend(EntryBackend):
    def __init__(self, deployment: ProcessDeployment):
        super().__init__(deployment, deployment.gateway)

    def dead(self) -> str | None:
        return self.deployment.failure


__all__ = ["GatewayBackend"]
