"""The HTTP app's `Backend` over a process-based deployment: the frontend runs here, so
everything but liveness is the in-process adapter's; liveness comes from the launcher,
which watches the child processes."""

from __future__ import annotations

from mstar.api_server.backend import LocalBackend


class ProcessBackend(LocalBackend):
    def failed(self) -> str | None:
        errors = self.frontend.startup_errors
        if errors:
            return "; ".join(f"{address} failed to start: {error}"
                             for address, error in sorted(errors.items()))
        return self.deployment.failure
