"""Serving: a deployment as processes behind HTTP (`run_server`)."""

from typing import Any


def run_server(settings: Any, config: Any) -> int:
    from mstar.serving.launcher import run_server as run

    return run(settings, config)


__all__ = ["run_server"]
